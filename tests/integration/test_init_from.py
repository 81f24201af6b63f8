"""``model.init_from`` + ``model.lock_image`` through the real pretraining path (local Ray, DeepSpeed, MLflow).

A short run on real Fashion-MNIST shards (its text tower locked at the random start) exports its model in
OpenAI's layout; a second run starts from that file with the image tower locked. Its export must hold the starting image tower bit for bit, a changed text
tower, and score higher zero-shot on the held-out images than the starting model did; its MLflow params must
count the frozen image tower. A file of another architecture is refused by ``jobs/pretrain.py`` with exit
code 2 before Ray starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from models import create_model, tower_parameters
from orchestrator.runs import EXPORT_FILE
from orchestrator.train import build_trainer

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def _export(result) -> dict[str, torch.Tensor]:
    with result.checkpoint.as_directory() as directory:
        return torch.load(os.path.join(directory, EXPORT_FILE))


def test_lit_fine_tune_keeps_the_image_tower_and_improves_zero_shot(tiny_run_config, tmp_path):
    # The starting checkpoint has a trained image tower and a text tower still at its random initialisation
    # (trained 100 steps with lock_text), as a pretrained model whose text side does not yet fit the domain;
    # fine-tuning its text against the locked image tower must then score clearly higher on 1,000 held-out
    # images (binomial noise ~0.015; measured 0.461 -> 0.575).
    scoring = ["eval.max_images=1000", "checkpoint.every_steps=1000", "tracking.log_every_steps=25",
               "schedule.warmup_steps=20", "optim.lr=3e-3"]
    start = build_trainer(tiny_run_config(*scoring, "schedule.total_steps=100", "model.lock_text=true")).fit()
    start_file = tmp_path / "start.pt"
    torch.save(_export(start), start_file)

    cfg = tiny_run_config(*scoring, f"model.init_from={start_file}", "model.lock_image=true",
                          "schedule.total_steps=60")
    tuned = build_trainer(cfg).fit()

    before, after = torch.load(start_file), _export(tuned)
    image = set(tower_parameters(create_model("ViT-tiny"), "image"))
    assert all(torch.equal(after[name], before[name]) for name in image)
    assert not torch.equal(after["text_projection"], before["text_projection"])
    assert tuned.metrics["zero_shot_top1"] > start.metrics["zero_shot_top1"] + 0.03, (start.metrics, tuned.metrics)

    params = MlflowClient(cfg.tracking.uri).get_run(tuned.metrics["mlflow_run_id"]).data.params
    image_size = sum(before[name].numel() for name in image)
    assert int(params["model.frozen_parameters"]) == image_size
    assert params["model.image_trainable_parameters"] == "0" and params["model.lock_image"] == "True"
    assert int(params["model.trainable_parameters"]) == sum(v.numel() for v in before.values()) - image_size


def test_weights_of_another_architecture_are_refused_before_ray(tmp_path):
    weights = tmp_path / "rn.pt"
    torch.save(create_model("RN-tiny").openai_state_dict(), weights)
    run = subprocess.run([sys.executable, str(REPO_ROOT / "jobs/pretrain.py"), "--set", f"model.init_from={weights}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"model.init_from={str(weights)!r} holds RN-tiny" in errors[0], run.stderr[-2000:]
    assert "model.name='ViT-tiny'" in errors[0] and "Traceback" not in run.stderr
    assert "ray" not in run.stdout.lower()
