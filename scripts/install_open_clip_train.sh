#!/usr/bin/env bash
# Makes the venv that runs open_clip's own trainer (open_clip_train, shipped inside open-clip-torch 3.3.0) for
# benchmarks/end_to_end.py. It sees our site packages (--system-site-packages), so it reuses our torch,
# torchvision, open-clip-torch, timm, pandas, fsspec and braceexpand instead of a second 5.5 GB torch; the one
# thing it adds is the webdataset that open-clip-torch[training] declares (<=0.2.86, where our site packages
# have 1.0.2), installed in the venv only, so pip never moves ours. transformers[sentencepiece], also in
# that extra, is left out: only Hugging Face text towers use it.
# On CPU the trainer needs, beyond this venv: `--device cpu` (else it warns and falls back),
# `--precision fp32` (its default `amp` autocasts to float16), gloo (its default off CUDA) and one change that
# no flag or variable gives: it wraps the model in DistributedDataParallel with device_ids=[device], which torch
# refuses for a CPU module, so the benchmark's launcher drops device_ids that name the CPU.
# Skipped (about 5 s, mostly importing torch) when the venv imports the trainer with the pinned webdataset. From
# nothing: 14 s on 2 cores with a warm pip cache, a 25 MB venv.
set -euo pipefail

venv="${XDG_CACHE_HOME:-$HOME/.cache}/rayclip/open-clip-train-venv"
version=3.3.0
webdataset=0.2.86
# The trainer, its data pipeline and the pinned webdataset; fails as well when a change of ours breaks what the
# venv borrows.
check="import importlib.metadata as m, open_clip_train.main, open_clip_train.data, torch.distributed.run
assert m.version('open-clip-torch') == '$version', m.version('open-clip-torch')
assert m.version('webdataset') == '$webdataset', m.version('webdataset')"
if "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
    exit 0
fi
python3 -m venv --clear --system-site-packages "$venv"
# open-clip-torch is ours (constraints.txt), named so that pip checks it and adds nothing else; webdataset 0.2.86
# needs braceexpand, numpy and pyyaml, which our site packages have; setuptools because the venv's own 65.5
# shadows ours and torch needs >=77.
"$venv/bin/pip" install -q --disable-pip-version-check "open-clip-torch==$version" "webdataset==$webdataset" \
    setuptools==84.2.1
"$venv/bin/python" -c "$check" || { echo "open_clip_train installed in $venv but does not import" >&2; exit 1; }
