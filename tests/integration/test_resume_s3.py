"""Checkpoint -> resume on S3 storage (a real moto server): the resumed job continues the same run.

Job 1 stops after 4 of 8 scheduled steps (``schedule.stop_after_steps``), checkpointing to
``s3://.../runs``; job 2 is ``--resume`` of that run name. Together they must log each step 1..8 exactly
once to one MLflow run, follow the 8-step schedule's learning rates across the boundary (optimizer and
scheduler restored, not restarted), keep the loss where it was, and consume every sample at most once.
"""

from __future__ import annotations

import json
import os

import boto3
import pytest

from orchestrator.train import build_trainer, lr_multiplier, name_run
from tests.factories import metric_history

pytestmark = pytest.mark.integration


def test_resume_from_s3_continues_the_same_run(tiny_run_config, s3_endpoint):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="rayclip-ckpt")
    s3 = ["checkpoint.storage_path=s3://rayclip-ckpt/runs", f"checkpoint.s3_endpoint_url={s3_endpoint}",
          "checkpoint.audit_sample_ids=true"]
    first = tiny_run_config(*s3, "schedule.stop_after_steps=4")
    stopped = build_trainer(first).fit()
    assert stopped.metrics["step"] == 4
    assert stopped.checkpoint.path.startswith("rayclip-ckpt/runs/")  # on S3, not on local disk

    resumed_cfg = name_run(tiny_run_config(*s3), resume=first.name)
    resumed = build_trainer(resumed_cfg).fit()
    assert resumed.metrics["step"] == 8
    run_id = stopped.metrics["mlflow_run_id"]
    assert resumed.metrics["mlflow_run_id"] == run_id

    losses = metric_history(resumed_cfg.tracking.uri, run_id, "train/loss")
    assert sorted(losses) == list(range(1, 9))
    assert abs(losses[5] - losses[4]) < 0.5 and losses[8] < losses[1], losses  # continued, not restarted
    lrs = metric_history(resumed_cfg.tracking.uri, run_id, "train/lr")
    for step in range(5, 9):  # lr logged after the step: the scheduler has already advanced
        expected = resumed_cfg.optim.lr * lr_multiplier(step, kind="cosine", warmup_steps=2, total_steps=8)
        assert lrs[step] == pytest.approx(expected, rel=1e-6, abs=1e-12)

    with resumed.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, "train_state.json")) as handle:
            state = json.load(handle)
        assert sorted(os.listdir(os.path.join(directory, "rng"))) == ["rank_00000.pt", "rank_00001.pt"]
    audit = state["data_position"]["audit"]
    assert len(audit) == 8 * resumed_cfg.global_batch_size
    assert len(set(audit)) == len(audit), "a sample was trained on twice"
