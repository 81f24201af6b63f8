#!/usr/bin/env bash
# Set up from nothing and run the whole test suite (unit + integration; the GPU check is scripts/gpu_check.sh, on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
python3 -m pytest -q -p no:cacheprovider tests/unit tests/integration "$@"
