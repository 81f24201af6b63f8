"""The GPU check's worker-path checks, dry-run on the CPU so that they cannot rot between runs on a GPU machine.

``scripts/gpu_check.sh`` runs ``benchmarks/gpu_train_path.py`` (the command line of
``harness.train_path.run_checks``) on a GPU machine only; the checks drive the training
worker's own functions (engine, step, in-loop evaluation, export, compile) outside Ray, so a change to those
functions can break them silently (it did once: the worker gained its loss as a field the script did not set).
Here ``run_checks`` runs with ``device="cpu"`` on ViT-tiny, each time in a fresh process (its DeepSpeed
group must not outlive it): the plain recipe with ``model.compile``, and SigLIP with FLIP's patch dropout
under ZeRO-3; every check must pass and the SigLIP export must carry one tensor more (its bias).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from harness.local_servers import free_port
from harness.train_path import failed_checks, run_checks

pytestmark = pytest.mark.integration
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "local.yaml")


def _checks_in_this_process(port: int, overrides: list[str], compile_model: str | None) -> list[dict]:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_PORT=str(port))  # read when run_checks imports DeepSpeed
    return run_checks(CONFIG, ["model.name=ViT-tiny", *overrides], device="cpu", micro_batch=8, steps=4,
                      compile_model=compile_model)


def _dry_run(*overrides: str, compile_model: str | None = None) -> dict[str, dict]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
        records = fresh.submit(_checks_in_this_process, free_port(), list(overrides), compile_model).result(timeout=600)
    assert not failed_checks(records), records
    return {record["check"]: record for record in records}


def test_the_worker_path_checks_pass_on_cpu():
    plain = _dry_run(compile_model="ViT-tiny")
    assert set(plain) == {"setup", "steps", "eval", "export", "compile"}
    assert all(record["ok"] for name, record in plain.items() if name != "setup")
    recipes = _dry_run("loss.kind=siglip", "model.patch_dropout=0.5", "deepspeed.zero_stage=3")
    assert recipes["setup"]["zero_stage"] == 3 and recipes["steps"]["ok"] and recipes["export"]["ok"]
    assert recipes["export"]["tensors"] == plain["export"]["tensors"] + 1  # logit_bias
