"""Checkpoints through Ray Train: every rank saves its ZeRO shard, barrier, every rank reports.

A checkpoint directory (merged by Ray Train from all ranks' local directories, in ``RunConfig.storage_path``,
local or S3) holds:

    ds/...                  DeepSpeed's files: model states, every rank's ZeRO optimizer (and ZeRO-3
                            parameter) partition, the LR scheduler
    train_state.json        step, samples seen, counters, data-stream position, MLflow run id (rank 0)
    rng/rank_00003.pt       each rank's torch/numpy/python RNG states
    openai_model.pt         final checkpoint only: the consolidated model in OpenAI's state-dict layout

Reporting from rank 0 only (Ray's examples) would lose every other rank's ZeRO partition (Ray #33369).
Resume needs the same worker count as the checkpoint: ZeRO optimizer partitions are per rank, and
changing the count needs DeepSpeed's universal-checkpoint conversion, which is not done here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

DEEPSPEED_TAG = "ds"
STATE_FILE = "train_state.json"
EXPORT_FILE = "openai_model.pt"


@dataclass
class TrainState:
    """Everything besides model/optimizer/scheduler that a resumed run needs to continue exactly."""

    step: int = 0
    """Optimizer steps done."""
    samples_seen: int = 0
    """Training samples consumed across all ranks (skipped steps included)."""
    nonfinite_steps: int = 0
    """Steps skipped because the loss was NaN/inf, over the whole run."""
    nonfinite_in_row: int = 0
    """Consecutive skipped steps right now."""
    data_position: dict[str, Any] = field(default_factory=dict)
    """The data stream's resumable position (opaque here, owned by ``orchestrator.data``)."""
    mlflow_run_id: str | None = None
    """The MLflow run this job logs to, so a resumed job continues the same run."""
    world_size: int = 1
    """Workers that wrote the checkpoint (ZeRO partitions are per rank)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _rng_file(rank: int) -> str:
    return os.path.join("rng", f"rank_{rank:05d}.pt")


def _capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_local_checkpoint(engine, state: TrainState, rank: int, directory: str) -> None:
    """This rank's part of a checkpoint into ``directory`` (collective: DeepSpeed synchronises ranks)."""
    engine.save_checkpoint(directory, tag=DEEPSPEED_TAG)
    rng_path = os.path.join(directory, _rng_file(rank))
    os.makedirs(os.path.dirname(rng_path), exist_ok=True)
    torch.save(_capture_rng(), rng_path)
    if rank == 0:
        with open(os.path.join(directory, STATE_FILE), "w") as handle:
            json.dump(dataclasses.asdict(state), handle)


def save_and_report(engine, state: TrainState, rank: int, metrics: dict[str, Any], extra_files=None) -> None:
    """Save this rank's shard, wait for all ranks, then report it to Ray Train (which merges and uploads).

    ``extra_files`` maps names to local paths copied into the checkpoint (rank 0's export).
    """
    import ray.train

    directory = tempfile.mkdtemp(prefix=f"rayclip-ckpt-{state.step:08d}-r{rank}-")
    try:
        write_local_checkpoint(engine, state, rank, directory)
        for name, path in (extra_files or {}).items():
            shutil.copyfile(path, os.path.join(directory, name))
        if dist.is_initialized():
            dist.barrier()  # no rank reports a checkpoint another rank has not finished writing
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint_step_{state.step:08d}",
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def restore(engine, checkpoint, rank: int, world_size: int) -> TrainState:
    """Load model, optimizer, scheduler, RNG and the train state from a Ray Train checkpoint."""
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, STATE_FILE)) as handle:
            state = TrainState.from_dict(json.load(handle))
        if state.world_size != world_size:
            raise RuntimeError(
                f"checkpoint {checkpoint.path} was written by {state.world_size} workers but this run has "
                f"{world_size}: ZeRO optimizer partitions are per rank; set scaling.num_workers="
                f"{state.world_size} to resume it"
            )
        load_path, _ = engine.load_checkpoint(directory, tag=DEEPSPEED_TAG)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}/{DEEPSPEED_TAG}")
        _restore_rng(torch.load(os.path.join(directory, _rng_file(rank)), weights_only=False))
    return state
