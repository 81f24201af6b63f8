"""A run checkpointed by 2 workers resumes on 1: the checkpoint is re-partitioned, not refused.

Job 1 (2 workers, ZeRO-2) stops after 4 of 8 steps; job 2 is ``--resume`` of it with
``scaling.num_workers=1``. DeepSpeed's ZeRO optimizer partitions are per rank, so the restore converts the
checkpoint to the universal layout first (``orchestrator.train.checkpoint``). The resumed job must finish the
same MLflow run at step 8, follow the 8-step learning-rate schedule and train on no sample twice, and its
own checkpoints must record 1 worker. That weights and Adam moments come back exactly on 1 and on 3 ranks
is checked in ``test_checkpoint_resize.py``.
"""

from __future__ import annotations

import json
import os

import pytest
from mlflow import MlflowClient

from orchestrator.train import build_trainer, lr_multiplier, name_run

pytestmark = pytest.mark.integration


def test_resume_on_fewer_workers_continues_the_run(tiny_run_config, capfd):
    common = ["deepspeed.zero_stage=2", "checkpoint.audit_sample_ids=true", "eval.enabled=false"]
    first = tiny_run_config(*common, "schedule.stop_after_steps=4")
    stopped = build_trainer(first).fit()
    assert stopped.metrics["step"] == 4

    resumed_cfg = name_run(tiny_run_config(*common, "scaling.num_workers=1"), resume=first.name)
    resumed = build_trainer(resumed_cfg).fit()
    assert resumed.metrics["step"] == 8
    assert "checkpoint of 2 workers resumed on 1" in capfd.readouterr().out
    run_id = stopped.metrics["mlflow_run_id"]
    assert resumed.metrics["mlflow_run_id"] == run_id

    client = MlflowClient(tracking_uri=resumed_cfg.tracking.uri)
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert sorted(losses) == list(range(1, 9))  # (the loss itself drops at step 5: log of a halved batch)
    for metric in client.get_metric_history(run_id, "train/lr"):
        if metric.step > 4:
            expected = resumed_cfg.optim.lr * lr_multiplier(metric.step, kind="cosine", warmup_steps=2, total_steps=8)
            assert metric.value == pytest.approx(expected, rel=1e-6, abs=1e-12)

    with resumed.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, "train_state.json")) as handle:
            state = json.load(handle)
        assert sorted(os.listdir(os.path.join(directory, "rng"))) == ["rank_00000.pt"]
    assert state["world_size"] == 1
    audit = state["data_position"]["audit"]
    per_worker = resumed_cfg.deepspeed.micro_batch_size
    assert len(audit) == 4 * 2 * per_worker + 4 * 1 * per_worker
    assert len(set(audit)) == len(audit), "a sample was trained on twice"
