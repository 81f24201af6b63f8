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
``checkpoint.num_to_keep``. Loading verifies the files against the manifest first (``restore``).

Resume on another worker count (a resized cluster, ``--resume`` with a new ``scaling.num_workers``): ZeRO
optimizer partitions are per rank, so the checkpoint is first converted to DeepSpeed's *universal* layout
(one file per parameter and optimizer state, ``deepspeed.checkpoint.ds_to_universal``) by local rank 0 of
each node into a node-local scratch folder, and the engine, built with ``load_universal``, re-partitions
it for the new count. Parameters, Adam moments, scheduler and step come back exactly; ranks the old run
did not have start fresh RNG streams.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import pyarrow.fs as pafs
import torch.distributed as dist

from orchestrator import runs, storage
from orchestrator.collectives import all_gather_objects, broadcast_from_chief
from orchestrator.data import DataPosition
from orchestrator.failures import CannotHeal
from orchestrator.logs import get_logger
from orchestrator.runs import DEEPSPEED_TAG, STATE_FILE, checkpoint_dir_name

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


def save_and_report(engine, state: TrainState, rank: int, metrics: dict[str, Any], run: storage.Location,
                    extra_files=None) -> str:
    """Save this rank's shard into the folder of ``run`` (``runs.run_location``), then the manifest (rank 0, once
    every rank's files are there), then report the checkpoint to Ray Train (collective). Returns its URL.

    rayclip uploads the files itself (Ray Train is told ``NO_UPLOAD``) so that the manifest can be written
    after every rank's upload succeeded. A failed upload on any rank removes the folder and raises
    :class:`CheckpointNotSaved` on every rank, naming where it failed. ``extra_files`` maps names to local
    paths copied into the checkpoint (rank 0's export).
    """
    import ray.train
    from ray.train import CheckpointUploadMode

    name = _agreed_dir_name(run, state.step)
    target = run.child(name)
    directory = tempfile.mkdtemp(prefix=f"rayclip-ckpt-{state.step:08d}-r{rank}-")
    try:
        write_local_checkpoint(engine, state, rank, directory)  # collective (DeepSpeed's own barriers)
        for file_name, path in (extra_files or {}).items():
            shutil.copyfile(path, os.path.join(directory, file_name))
        files, failure = _upload(directory, target)
        outcomes = all_gather_objects((files, failure))
        failures = [f"rank {r}: {failure}" for r, (_, failure) in enumerate(outcomes) if failure]
        if not failures and rank == 0:
            failures = _finish_manifest(target, state, outcomes)
        failures = broadcast_from_chief(failures)
        if failures:
            if rank == 0:
                _remove(target)
            raise CheckpointNotSaved(f"the step-{state.step} checkpoint was not saved ({failures[0]}); its partial "
                                     f"folder {target.url} was removed")
        storage_context = ray.train.get_context().get_storage()  # Ray Train manages what is on its own filesystem
        reported = ray.train.Checkpoint(storage_context.build_checkpoint_path_from_name(name),
                                        storage_context.storage_filesystem)
        ray.train.report(metrics, checkpoint=reported if rank == 0 else None, checkpoint_dir_name=name,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        if rank == 0:
            logger.info("step %d: checkpoint saved to %s", state.step, target.url)
        return target.url
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _agreed_dir_name(run: storage.Location, step: int) -> str:
    """The step's folder name, chosen by rank 0 among those not yet in storage (a step saved again after a resume
    from an older checkpoint must not write into the folder of its first save)."""
    name = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        attempt = 1
        while storage.exists(run.child(checkpoint_dir_name(step, attempt))):
            attempt += 1
        name = checkpoint_dir_name(step, attempt)
    return broadcast_from_chief(name)


def _upload(directory: str, target: storage.Location) -> tuple[dict, str | None]:
    """This rank's files described (sizes, SHA-256) and copied to ``target``; a failure as one line instead."""
    try:
        files = runs.describe_files(directory)
        target.fs.create_dir(target.path, recursive=True)
        pafs.copy_files(directory, target.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=target.fs)
        return files, None
    except Exception as error:  # noqa: BLE001 (whatever storage raised, this checkpoint was not saved)
        return {}, _write_failure(error, target)


def _write_failure(error: Exception, target: storage.Location) -> str:
    """What went wrong writing ``target``, with the free space there when it is a local disk."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    disk_full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text
    where = None if target.is_s3 else _existing_parent(target.path)
    if disk_full and where is not None:
        usage = shutil.disk_usage(where)
        return (f"no space left on the disk holding {where} ({usage.free / 1e6:.1f} MB free of "
                f"{usage.total / 1e6:.1f} MB): {text}")
    return text


def _existing_parent(path: str) -> str | None:
    """The nearest existing local folder of ``path``."""
    while path and not os.path.isdir(path):
        path = os.path.dirname(path)
    return path or None


def _finish_manifest(target: storage.Location, state: TrainState, outcomes: list) -> list[str]:
    """Rank 0: the merged file table written as the manifest, last; a failure as one line."""
    files = {name: entry for rank_files, _ in outcomes for name, entry in rank_files.items()}
    try:
        runs.write_manifest(target, state.step, len(outcomes), files)
    except Exception as error:  # noqa: BLE001 (whatever storage raised, the checkpoint is not complete)
        return [f"rank 0: {_write_failure(error, target)}"]
    return []


def _remove(target: storage.Location) -> None:
    try:
        runs.remove_checkpoint(target)
    except OSError as error:
        logger.warning("could not remove the partial checkpoint folder %s (%s)", target.url, error)


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
