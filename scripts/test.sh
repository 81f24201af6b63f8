#!/usr/bin/env bash
# Set up from nothing and run the whole test suite (unit + integration; the GPU check is
# scripts/gpu_check.sh, on a GPU machine). Arguments, if any, go to pytest instead of the default paths.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/install_img2dataset.sh
bash scripts/install_clip_benchmark.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 DS_ACCELERATOR=cpu
# (see orchestrator/__init__.py: test modules may import mlflow before orchestrator)
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
# DeepSpeed builds its CPU comm op once per machine (60-90 s), shared by every checkout
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rayclip/torch_extensions}"
if [ "$#" -gt 0 ]; then
    exec python3 -m pytest -q -p no:cacheprovider "$@"
fi
# The scenarios that build Ray clusters of their own (a killed worker node, an elastic run that loses and
# regains a node, a head whose autoscaler adds and removes nodes) run alone, after the suite's shared local Ray has
# shut down, so that on 2 cores two clusters never compete for the cores.
fault_tolerance=tests/integration/test_fault_tolerance_node.py
own_clusters=(tests/integration/test_elastic_node.py tests/integration/test_autoscaling_job.py)
python3 -m pytest -q -p no:cacheprovider --durations=12 tests/unit tests/integration \
    --deselect "$fault_tolerance::test_killed_worker_node_is_survived" $(printf -- '--ignore=%s ' "${own_clusters[@]}")
python3 -m pytest -q -p no:cacheprovider "$fault_tolerance" "${own_clusters[@]}"
