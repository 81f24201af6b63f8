"""2 Ray Train workers x DeepSpeed ZeRO 1, 2 and 3 on CPU train CLIP on real Fashion-MNIST shards.

Each run goes through the real stack: local Ray, Ray Data stream, DeepSpeed (gloo), MLflow (sqlite).
The loss read back from MLflow must fall, the run must end at the scheduled step with every rank's
ZeRO partition in the final checkpoint, the exported model must load into a fresh CLIP strictly with
weights moved away from the seeded start, and evaluated alone it must score what the sharded evaluation reported.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from models import create_model
from orchestrator.eval import FeatureEncoder, InLoopEvaluation, WorkerFeatures, zero_shot
from orchestrator.plan import config_shape, rank_bytes
from orchestrator.train import build_model, build_trainer
from tests.factories import metric_history

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_two_workers_train_and_loss_falls(tiny_run_config, zero_stage):
    cfg = tiny_run_config(f"deepspeed.zero_stage={zero_stage}")
    result = build_trainer(cfg).fit()

    assert result.metrics["step"] == cfg.schedule.total_steps
    history = metric_history(cfg.tracking.uri, result.metrics["mlflow_run_id"], "train/loss")
    losses = [history[step] for step in sorted(history)]
    assert len(losses) == cfg.schedule.total_steps
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses

    with result.checkpoint.as_directory() as directory:
        partitions = sorted(os.listdir(os.path.join(directory, "ds")))
        assert [p for p in partitions if "optim_states" in p] == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
        exported = torch.load(os.path.join(directory, "openai_model.pt"))
        # the planner's bytes per rank (jobs/plan.py's checkpoint line) against DeepSpeed's files
        written = [0] * cfg.scaling.num_workers
        for name in partitions:
            rank = int(re.match(r"zero_pp_rank_(\d+)_", name).group(1)) if name.startswith("zero_pp_rank_") else 0
            written[rank] += os.path.getsize(os.path.join(directory, "ds", name))
    predicted = rank_bytes(config_shape(cfg, cfg.scaling.num_workers))
    assert all(0.9 <= p / w <= 1.1 for p, w in zip(predicted, written)), (predicted, written)
    assert exported["logit_scale"].shape == ()
    model = create_model("ViT-tiny")
    model.load_openai_state_dict(exported)  # strict: every key and shape
    initial = build_model(cfg).state_dict()  # the seeded weights every rank started from
    assert not torch.equal(model.state_dict()["text_projection"], initial["text_projection"])
    assert not torch.equal(model.state_dict()["visual.conv1.weight"], initial["visual.conv1.weight"])

    # the sharded in-loop evaluation agrees with the exported model evaluated alone, in this process
    heldout = InLoopEvaluation(cfg).open(cfg.eval_sets()[0]).test
    alone = zero_shot(WorkerFeatures(FeatureEncoder(model.eval()), rank=0, world_size=1, batch_size=128), heldout)
    assert alone.images == cfg.eval.max_images
    assert abs(alone.metrics["zeroshot_top1"] - result.metrics["zero_shot_top1"]) <= 2 / alone.images
    assert abs(alone.metrics["zeroshot_top5"] - result.metrics["zero_shot_top5"]) <= 2 / alone.images
