#!/usr/bin/env bash
# The GPU checks on one GPU machine (torch + DeepSpeed in one process, no Ray): installs any wheels in
# .whl/ first (DeepSpeed and the few packages a GPU image may lack), then benchmarks/gpu_train_path.py and
# benchmarks/gpu_step.py variants.
# Results go to $OUT/gpu_step.jsonl when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
# rayclip is not pip-installed on the GPU machine: its packages come from this checkout (the benchmarks
# edit no sys.path).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
results="${OUT:-/tmp}/gpu_step.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The training worker's own functions (bf16 autocast steps, zero-shot eval, export, model.compile) first.
python3 benchmarks/gpu_train_path.py --config configs/vit_l14.yaml --micro-batch 64 --steps 10 \
    --compile-model ViT-B/32 --json "${OUT:-/tmp}/gpu_train_path.jsonl"
python3 benchmarks/gpu_step.py --models ViT-L/14 --precision autocast --steps 6 --json "$results"
python3 benchmarks/gpu_step.py --models ViT-L/14 --precision autocast --batch 256 --compile --steps 6 --json "$results"
python3 benchmarks/gpu_step.py --models RN50x64 --precision autocast --steps 6 --json "$results"
python3 benchmarks/gpu_step.py --models ViT-L/14 --plain --batch 256 --compile --steps 6 --json "$results"
# The recipes: SigLIP with FLIP's patch dropout through the worker's code (bf16 autocast, ZeRO-1), then each one's
# ViT-L/14 step against the first ViT-L/14 autocast step above (MFU counted on the tokens patch dropout keeps).
python3 benchmarks/gpu_train_path.py --config configs/vit_l14.yaml --micro-batch 64 --steps 10 \
    --set loss.kind=siglip --set model.patch_dropout=0.5 --json "${OUT:-/tmp}/gpu_train_path.jsonl"
python3 benchmarks/gpu_step.py --models ViT-L/14 --precision autocast --patch-dropout 0.5 --steps 6 --json "$results"
python3 benchmarks/gpu_step.py --models ViT-L/14 --precision autocast --patch-dropout 0.5 --batch 256 --steps 6 --json "$results"
python3 benchmarks/gpu_step.py --models ViT-L/14 --precision autocast --loss siglip --steps 6 --json "$results"
