#!/usr/bin/env bash
# Set up from nothing and run the demo: the model zoo, then Fashion-MNIST shards -> CLIP pretraining
# (configs/local.yaml: 2 Ray Train workers, DeepSpeed ZeRO-1, CPU) -> zero-shot accuracy on the 10k test images.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 DS_ACCELERATOR=cpu
export RAY_DATA_DISABLE_PROGRESS_BARS=1  # keep the demo's output to training progress and results
# DeepSpeed builds its CPU comm op once per machine (60-90 s), shared by every checkout
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rayclip/torch_extensions}"
python3 jobs/model_zoo.py
python3 jobs/demo.py "$@"
