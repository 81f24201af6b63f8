"""Checkpoints: every rank writes its ZeRO shard into the run's storage, then a manifest marks it complete.

A checkpoint folder (``<checkpoint.storage_path>/<run>/checkpoint_step_NNNNNNNN``, local or S3) holds:

    ds/...                  DeepSpeed's files: model states, every rank's ZeRO optimizer (and ZeRO-3
                            parameter) partition, the LR scheduler
    train_state.json        step, samples seen, counters, data-stream position, MLflow run id (rank 0)
    rng/rank_00003.pt       each rank's torch/numpy/python RNG states
    openai_model.pt         final checkpoint only: the consolidated model in OpenAI's state-dict layout
    manifest.json           every file with its size and SHA-256, written by rank 0 once all ranks' uploads
                            succeeded: a folder without one is a save that never finished

Every rank uploads its own files (reporting from rank 0 only, as Ray's examples do, would lose every other
rank's ZeRO partition: Ray #33369); the checkpoint is then reported to Ray Train, which keeps the last
``checkpoint.num_to_keep``. Loading verifies the files against the manifest first (``restore``). The
save itself: ``checkpoint_upload``.

Resume on another worker count (a resized cluster, ``--resume`` with a new ``scaling.num_workers``): ZeRO
optimizer partitions are per rank, so the checkpoint is first converted to DeepSpeed's *universal* layout
(one file per parameter and optimizer state, ``deepspeed.checkpoint.ds_to_universal``) by local rank 0 of
each node into a node-local scratch folder, and the engine, built with ``load_universal``, re-partitions
it for the new count. Parameters, Adam moments, scheduler and step come back exactly; ranks the old run
did not have start fresh RNG streams.
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

from orchestrator import runs
from orchestrator.collectives import all_gather_objects
from orchestrator.data import DataPosition
from orchestrator.failures import CannotHeal
from orchestrator.logs import get_logger
from orchestrator.runs import DEEPSPEED_TAG, STATE_FILE

logger = get_logger("train")

UNIVERSAL_TAG = "universal"  # a checkpoint converted for another worker count, in a scratch folder


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
    data_position: DataPosition = field(default_factory=DataPosition)
    """The data stream's resumable position (``orchestrator.data.DataPosition``)."""
    mlflow_run_id: str | None = None
    """The MLflow run this job logs to, so a resumed job continues the same run."""
    world_size: int = 1
    """Workers that wrote the checkpoint (ZeRO partitions are per rank)."""

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "data_position": self.data_position.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known}
        return cls(**{**fields, "data_position": DataPosition.from_json(fields.get("data_position"))})


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
            json.dump(state.to_json(), handle)


class CheckpointNotSaved(CannotHeal):
    """A checkpoint could not be written (a full disk, storage refusing writes); its partial folder is gone."""


class CheckpointDamaged(RuntimeError):
    """A checkpoint's files do not match its manifest. Retried: the next start skips it (it is marked damaged)."""


class NoIntactCheckpoint(CannotHeal):
    """The run has checkpoints, and every one of them is damaged."""


def resume_point(cfg, *, settle: bool = False) -> runs.CheckpointInfo | None:
    """The checkpoint a (re)started run continues from: the newest complete one (``runs.resume_checkpoint``), or
    None for a run that has none yet. With ``settle`` (the driver before Ray, rank 0 of a worker group), each
    newer checkpoint passed over is dealt with once: a damaged one reported and marked, an incomplete one (a
    save that never finished) removed.

    The controller (the data position) and every worker (the weights) call this on the same storage, so they
    agree. A run whose every checkpoint is damaged raises :class:`NoIntactCheckpoint` rather than start over.
    """
    run = runs.run_location(cfg.checkpoint.storage_path, cfg.checkpoint.s3_endpoint_url, cfg.name)
    chosen, passed_over = runs.resume_checkpoint(run)
    damaged = [c for c in passed_over if not c.incomplete]
    if chosen is None and damaged:
        raise NoIntactCheckpoint(f"no intact checkpoint of {cfg.name} to resume from ("
                                 + "; ".join(f"{c.name}: {c.problem}" for c in damaged) + ")")
    if settle:
        target = f"{chosen.name} (step {chosen.step})" if chosen else "the start"
        for skipped in passed_over:
            if skipped.incomplete:
                runs.remove_checkpoint(skipped.location)
                logger.info("removed %s: %s", skipped.location.url, skipped.problem)
            elif not skipped.marked:
                runs.mark_damaged(skipped.location, skipped.problem)
                logger.warning("%s is damaged (%s): resuming from %s", skipped.location.url, skipped.problem, target)
    return chosen


def report_metrics(metrics: dict[str, Any]) -> None:
    """Report metrics to Ray Train without a checkpoint (every rank calls it, as for checkpoints); under Ray
    Tune they reach the trial's scheduler (ASHA) between checkpoints."""
    import ray.train

    ray.train.report(metrics)


def read_state(filesystem, path: str) -> TrainState:
    """The train state stored in the checkpoint folder ``path`` of ``filesystem`` (a pyarrow filesystem);
    reads that one small file, not the whole checkpoint."""
    with filesystem.open_input_stream(f"{path.rstrip('/')}/{STATE_FILE}") as handle:
        return TrainState.from_json(json.loads(handle.read()))


def saved_state(checkpoint: runs.CheckpointInfo) -> TrainState:
    """The train state of a checkpoint (to see, before building the engine, how many workers wrote it)."""
    return read_state(checkpoint.location.fs, checkpoint.location.path)


def restore(engine, info: runs.CheckpointInfo, rank: int, world_size: int, local_rank: int = 0) -> TrainState:
    """Verify a checkpoint against its manifest, then load model, optimizer, scheduler, RNG and the train state.

    Every rank checks the SHA-256 of its share of the files; a mismatch anywhere marks the checkpoint damaged
    in storage and raises :class:`CheckpointDamaged` on every rank (the restarted group resumes from the newest
    intact one). A checkpoint of another worker count needs an engine built with ``load_universal=True``
    (``orchestrator.train.engine.build_engine``); every rank calls this (collective).
    """
    import ray.train

    checkpoint = ray.train.Checkpoint(info.location.path, info.location.fs)
    with checkpoint.as_directory() as directory:
        _verify(directory, info, rank, world_size)
        with open(os.path.join(directory, STATE_FILE)) as handle:
            state = TrainState.from_json(json.load(handle))
        if state.world_size == world_size:
            load_dir, tag = directory, DEEPSPEED_TAG
        else:
            load_dir, tag = _universal_copy(directory, checkpoint.path, local_rank), UNIVERSAL_TAG
        load_path, _ = engine.load_checkpoint(load_dir, tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {load_dir}/{tag}")
        rng_path = os.path.join(directory, _rng_file(rank))
        if os.path.exists(rng_path):
            _restore_rng(torch.load(rng_path, weights_only=False))
    if state.world_size != world_size:
        if dist.is_initialized():
            dist.barrier()  # every rank has loaded before the node's scratch copy goes
        if local_rank == 0:
            shutil.rmtree(load_dir, ignore_errors=True)
        if rank == 0:
            logger.info("checkpoint of %d workers resumed on %d (converted to DeepSpeed's universal layout); "
                        "the global batch changes with the worker count", state.world_size, world_size)
        state.world_size = world_size
    return state


def _verify(directory: str, info: runs.CheckpointInfo, rank: int, world_size: int) -> None:
    """Every rank checks its share of the manifest's files (collective); all raise if any file is wrong."""
    if not info.verified:
        return  # written before manifests: nothing to check against
    with open(os.path.join(directory, runs.MANIFEST_FILE)) as handle:
        manifest = json.load(handle)
    problems = [p for part in all_gather_objects(runs.checksum_problems(directory, manifest, sorted(manifest["files"])[rank::world_size]))
                for p in part]
    if problems:
        problem = f"{'; '.join(problems[:2])}{f' (+{len(problems) - 2} more)' if len(problems) > 2 else ''}"
        if rank == 0:
            runs.mark_damaged(info.location, problem)
            logger.warning("%s is damaged (%s): marked, restarting from the newest intact checkpoint",
                           info.location.url, problem)
        raise CheckpointDamaged(f"{info.location.url} is damaged: {problem}")


def _universal_copy(directory: str, checkpoint_id: str, local_rank: int) -> str:
    """``directory``'s DeepSpeed checkpoint in the universal layout, converted once per node (collective).

    Returns the node-local scratch directory holding ``UNIVERSAL_TAG`` (the caller removes it after
    loading). Local rank 0 converts (a subprocess of DeepSpeed's converter, which reads every rank's
    partition); the other ranks wait at a barrier.
    """
    import hashlib
    import subprocess
    import sys

    key = hashlib.sha1(checkpoint_id.encode()).hexdigest()[:16]
    load_dir = os.path.join(tempfile.gettempdir(), f"rayclip-universal-{key}")
    if local_rank == 0:
        shutil.rmtree(load_dir, ignore_errors=True)
        os.makedirs(load_dir)
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                   "--input_folder", os.path.join(directory, DEEPSPEED_TAG),
                   "--output_folder", os.path.join(load_dir, UNIVERSAL_TAG),
                   "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
        run = subprocess.run(command, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"converting {checkpoint_id} for a new worker count failed:\n{run.stderr[-3000:]}")
    if dist.is_initialized():
        dist.barrier()
    return load_dir
