"""The recipes beside plain pretraining, through the real stack (Ray Train, DeepSpeed ZeRO-3 on gloo, MLflow).

SigLIP's sigmoid loss with FLIP's patch dropout, in exact accumulation chunks, stopped after its step-4
checkpoint and resumed: the run must end at its last step with patch dropout on for every step before the
unmasked tail and off for the tail (also after the resume, which rebuilds the model), the bias learned from
its -10 start, the loss falling, and the export carrying the bias as a SigLIP model loads it.
"""

from __future__ import annotations

import os

import pytest
import torch

from models import SIGLIP_INIT_LOGIT_BIAS, load_openai_checkpoint
from orchestrator.train import build_trainer, name_run
from tests.factories import metric_history

pytestmark = pytest.mark.integration


def test_siglip_with_patch_dropout_trains_resumes_and_exports_its_bias(tiny_run_config):
    recipe = ["loss.kind=siglip", "model.patch_dropout=0.5", "model.patch_dropout_off_last_steps=2",
              "deepspeed.zero_stage=3", "deepspeed.micro_batch_size=32", "deepspeed.grad_accum_steps=2"]
    first = tiny_run_config(*recipe, "schedule.stop_after_steps=4")
    assert first.loss.init_temperature == pytest.approx(0.1)  # SigLIP's start unless set
    stopped = build_trainer(first).fit()
    assert stopped.metrics["step"] == 4
    resumed_cfg = name_run(tiny_run_config(*recipe), resume=first.name)
    resumed = build_trainer(resumed_cfg).fit()
    assert resumed.metrics["step"] == 8

    run_id = stopped.metrics["mlflow_run_id"]
    uri = resumed_cfg.tracking.uri
    dropout = metric_history(uri, run_id, "train/patch_dropout")
    assert dropout == {**{step: 0.5 for step in range(1, 7)}, 7: 0.0, 8: 0.0}  # steps 5-6 after the resume too
    losses = metric_history(uri, run_id, "train/loss")
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1] - 0.5, losses
    bias = metric_history(uri, run_id, "train/logit_bias")
    assert all(abs(value - SIGLIP_INIT_LOGIT_BIAS) < 2 for value in bias.values())
    assert bias[8] != pytest.approx(bias[1], abs=1e-4)  # learned, not fixed

    with resumed.checkpoint.as_directory() as directory:
        exported = torch.load(os.path.join(directory, "openai_model.pt"))
    assert exported["logit_bias"].shape == () and float(exported["logit_bias"]) == pytest.approx(bias[8], abs=1e-5)
    model = load_openai_checkpoint(exported)
    assert model.spec.init_logit_bias is not None and float(model.logit_bias.detach()) == float(exported["logit_bias"])
    assert model.visual.patch_dropout == 0.0  # exports evaluate on every patch
    assert "zero_shot_top1" in resumed.metrics  # the in-loop evaluation ran on the SigLIP model (8 steps: near chance)
