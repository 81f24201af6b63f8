#!/usr/bin/env bash
# Set up from nothing and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
python3 jobs/model_zoo.py
