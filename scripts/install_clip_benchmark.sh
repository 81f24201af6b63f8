#!/usr/bin/env bash
# Installs LAION's CLIP_benchmark in its own venv, for tests that build and read benchmark sets in its
# WebDataset layout with its own writer and reader (tests/clip_benchmark_sets.py). The venv sees our site
# packages (--system-site-packages), so it reuses our torch, torchvision, open_clip, webdataset and
# tokenizers instead of a second 5.5 GB torch; what clip-benchmark adds (transformers, pycocoevalcap, ...)
# lands in the venv only, and pip never uninstalls outside it, so our environment does not move.
# Skipped (5 s of CPU, mostly importing torch) when the venv imports the pinned version. From nothing: 22 s of
# CPU on 2 cores with a cold pip cache (46 s wall on a shared machine, 25 s with a warm cache), a 273 MB venv
# (transformers 129 MB, pycocoevalcap's bundled Java tools 101 MB).
set -euo pipefail

venv="${XDG_CACHE_HOME:-$HOME/.cache}/rayclip/clip-benchmark-venv"
version=1.6.2
# Its writer and reader, and the version; fails as well when a change of ours breaks what the venv borrows.
check="import importlib.metadata as m, clip_benchmark.webdataset_builder
assert m.version('clip-benchmark') == '$version'"
if "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
    exit 0
fi
python3 -m venv --clear --system-site-packages "$venv"
# What the resolver added on Python 3.11 next to our pinned stack (constraints.txt), the day this was
# verified; setuptools because the venv's own 65.5 shadows ours and torch needs >=77.
"$venv/bin/pip" install -q --disable-pip-version-check "clip-benchmark==$version" \
    transformers==5.24.0 pycocoevalcap==1.2 pycocotools==2.0.11 typer==0.29.2 rich==15.0.0 \
    shellingham==1.5.4 markdown-it-py==4.3.0 mdurl==0.1.2 setuptools==84.2.1
"$venv/bin/python" -c "$check" || { echo "clip-benchmark installed in $venv but does not import" >&2; exit 1; }
