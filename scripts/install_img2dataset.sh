#!/usr/bin/env bash
# Installs the img2dataset CLI in its own venv (its pins — opencv, albumentations, wandb, webdataset —
# must not move ours), for tests that need real img2dataset output (tests/img2dataset_output.py).
# Skipped (~4 s) when that venv already runs the pinned version. From nothing: 84 s on 2 cores with a cold
# pip cache, a 780 MB venv; no apt package needed (opencv-python-headless bundles its libraries).
set -euo pipefail

venv="${XDG_CACHE_HOME:-$HOME/.cache}/rayclip/img2dataset-venv"
version=1.47.0
export NO_ALBUMENTATIONS_UPDATE=1  # albumentations asks PyPI for a newer release at every import
if "$venv/bin/img2dataset" --help >/dev/null 2>&1 \
    && [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("img2dataset"))')" = "$version" ]; then
    exit 0
fi
python3 -m venv --clear "$venv"
# Its dependencies at the versions this was verified with on Python 3.11 (the resolver's choices on that day);
# the opencv pin also fixes the text of decode errors that img2dataset writes into its stats.
"$venv/bin/pip" install -q --disable-pip-version-check "img2dataset==$version" \
    webdataset==0.2.111 opencv-python-headless==4.14.0.94 albumentations==1.4.24 numpy==2.4.6 \
    pandas==2.3.3 pyarrow==26.0.1 fsspec==2026.9.0 fire==0.7.1 wandb==0.31.0
"$venv/bin/img2dataset" --help >/dev/null 2>&1 || { echo "img2dataset installed in $venv but does not run" >&2; exit 1; }
