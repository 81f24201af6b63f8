"""2 Ray Train workers x DeepSpeed ZeRO 1, 2 and 3 on CPU train CLIP on real Fashion-MNIST shards.

Each run goes through the real stack: local Ray, Ray Data stream, DeepSpeed (gloo), MLflow (sqlite).
The loss read back from MLflow must fall, the run must end at the scheduled step with every rank's
ZeRO partition in the final checkpoint, and the exported model must load into a fresh CLIP strictly.
"""

from __future__ import annotations

import os

import pytest
import torch
from mlflow import MlflowClient

from models.registry import create_model
from orchestrator.trainer import build_trainer

pytestmark = pytest.mark.integration


def _loss_history(cfg, run_id: str) -> list[float]:
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    return [m.value for m in history]


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_two_workers_train_and_loss_falls(tiny_run_config, zero_stage):
    cfg = tiny_run_config(f"deepspeed.zero_stage={zero_stage}")
    result = build_trainer(cfg).fit()

    assert result.metrics["step"] == cfg.schedule.total_steps
    losses = _loss_history(cfg, result.metrics["mlflow_run_id"])
    assert len(losses) == cfg.schedule.total_steps
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    assert 0.0 <= result.metrics["zero_shot_top1"] <= 1.0

    with result.checkpoint.as_directory() as directory:
        partitions = sorted(os.listdir(os.path.join(directory, "ds")))
        assert [p for p in partitions if "optim_states" in p] == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
        exported = torch.load(os.path.join(directory, "openai_model.pt"))
    assert exported["logit_scale"].shape == ()
    model = create_model("ViT-tiny")
    model.load_openai_state_dict(exported)  # strict: every key and shape
    assert not torch.equal(model.state_dict()["text_projection"], create_model("ViT-tiny").state_dict()["text_projection"])
