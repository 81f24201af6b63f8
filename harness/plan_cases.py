"""The planner check's cases: 2 gloo workers train ViT-tiny (micro-batch 32, fp32) through
:func:`harness.measure.measure_steps`, and the :class:`~orchestrator.plan.StepShape` the planner predicts for
the same step. ``tests/integration/test_plan_measured.py`` bounds the prediction on a few of them,
``benchmarks/plan_check.py`` runs the full ZeRO x checkpointing x locked-tower matrix.

DeepSpeed's gradient bucket is ``BUCKET`` (1e6 elements) unless told otherwise: at its 5e8 default it is
2 GB, which would make any tiny-model comparison pass.
"""

from __future__ import annotations

import json
import os

import torch.multiprocessing as mp

from harness.local_servers import free_port
from harness.measure import measure_steps
from models import get_model_spec
from orchestrator.plan import StepShape, TowerLock

BUCKET = int(1e6)
MICRO = 32


def run_config(zero_stage: int, checkpointing: bool, workers: int = 2, lock: str | None = None) -> dict:
    """The run config of one case, as the plain dict a worker rebuilds it from."""
    model = {"name": "ViT-tiny", "grad_checkpointing": checkpointing} | ({f"lock_{lock}": True} if lock else {})
    return {"model": model, "scaling": {"num_workers": workers},
            "deepspeed": {"zero_stage": zero_stage, "micro_batch_size": MICRO, "global_batch_size": workers * MICRO,
                          "precision": "fp32"}, "schedule": {"warmup_steps": 1, "total_steps": 10},
            "eval": {"enabled": False}}


def predicted_shape(zero_stage: int, checkpointing: bool, world_size: int = 2, bucket: int = BUCKET,
                    lock: str | None = None) -> StepShape:
    """The step the planner predicts for the case (``bucket``: DeepSpeed's reduce and prefetch buckets)."""
    return StepShape(spec=get_model_spec("ViT-tiny"), world_size=world_size, zero_stage=zero_stage, precision="fp32",
                     micro_batch=MICRO, worker_batch=MICRO, global_batch=world_size * MICRO,
                     grad_checkpointing=checkpointing, reduce_bucket_size=bucket, prefetch_bucket_size=bucket,
                     locks=(TowerLock(lock),) if lock else ())


def _measure(rank: int, world_size: int, port: int, cfg: dict, overrides: dict, out: str) -> None:
    result = measure_steps(cfg, rank, world_size, port, zero_overrides=overrides)
    if rank == 0:
        with open(out, "w") as file:
            json.dump(result, file)


def measured(zero_stage: int, checkpointing: bool, folder, bucket: int | None = BUCKET, lock: str | None = None) -> dict:
    """Run the case on 2 spawned gloo workers; ``bucket`` None keeps DeepSpeed's default buckets."""
    overrides = {} if bucket is None else {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                                           "stage3_prefetch_bucket_size": bucket}
    out = os.path.join(folder, f"zero{zero_stage}_{checkpointing}_{lock}.json")
    cfg = run_config(zero_stage, checkpointing, lock=lock)
    mp.spawn(_measure, args=(2, free_port(), cfg, overrides, out), nprocs=2, join=True)
    with open(out) as file:
        return json.load(file)
