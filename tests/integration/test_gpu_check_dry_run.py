"""The GPU check's worker-path script, dry-run on the CPU so that it cannot rot between sessions with a GPU.

``scripts/gpu_check.sh`` runs ``benchmarks/gpu_train_path.py`` on a GPU only when a session is lent one; the
script drives the training worker's own functions (engine, step, in-loop evaluation, export, compile)
outside Ray, so a change to those functions can break it silently (it did once: the worker gained its loss
as a field the script did not set). Here it runs with ``--device cpu`` on ViT-tiny: the plain recipe with
``model.compile``, and SigLIP with FLIP's patch dropout under ZeRO-3, every check must pass and the SigLIP
export must carry one tensor more (its bias).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]


def _dry_run(tmp_path: Path, name: str, *extra: str) -> dict[str, dict]:
    out = tmp_path / f"{name}.jsonl"
    run = subprocess.run([sys.executable, "benchmarks/gpu_train_path.py", "--config", "configs/local.yaml",
                          "--set", "model.name=ViT-tiny", "--device", "cpu", "--micro-batch", "8", "--steps", "4",
                          "--json", str(out), *extra],
                         cwd=REPO_ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "all checks passed" in run.stdout
    return {record["check"]: record for record in map(json.loads, out.read_text().splitlines())}


def test_the_worker_path_script_passes_every_check_on_cpu(tmp_path):
    plain = _dry_run(tmp_path, "plain", "--compile-model", "ViT-tiny")
    assert set(plain) == {"setup", "steps", "eval", "export", "compile"}
    assert all(record["ok"] for name, record in plain.items() if name != "setup")
    recipes = _dry_run(tmp_path, "recipes", "--set", "loss.kind=siglip", "--set", "model.patch_dropout=0.5",
                       "--set", "deepspeed.zero_stage=3")
    assert recipes["setup"]["zero_stage"] == 3 and recipes["steps"]["ok"] and recipes["export"]["ok"]
    assert recipes["export"]["tensors"] == plain["export"]["tensors"] + 1  # logit_bias
