"""Saving a checkpoint: each rank's local write, its upload on a background thread, then the manifest and the report.

Training stops only for the local write (DeepSpeed's files into a scratch folder on the worker's own disk): the
upload, with its hashing, runs on a background thread of each rank while training goes on. The training loop asks
at every step whether all ranks' uploads have ended, and then completes the checkpoint (manifest, report); the next
checkpoint, an evaluation's report and the run's end wait for it first.

What a checkpoint folder holds, and loading it: ``orchestrator.train.checkpoint``.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from orchestrator import runs, storage
from orchestrator.collectives import all_gather_objects, all_reduce_sum, broadcast_from_chief
from orchestrator.logs import get_logger
from orchestrator.runs import checkpoint_dir_name
from orchestrator.train.checkpoint import CheckpointNotSaved, TrainState, write_local_checkpoint

logger = get_logger("train")


@dataclass
class PendingCheckpoint:
    """A checkpoint whose files are written locally and being uploaded by a background thread of this rank. It is
    complete, and reported to Ray Train, only once :func:`complete_checkpoint` has seen every rank's upload succeed
    and rank 0 has written the manifest: a process that dies before leaves a folder without one, which a resume
    passes over (and removes)."""

    step: int
    name: str
    """The folder's name under the run (``checkpoint_step_NNNNNNNN``, a suffix when that step was saved before)."""
    target: storage.Location
    metrics: dict[str, Any]
    paused_s: float
    """How long the training thread stopped for this checkpoint (the local write)."""
    outcome: tuple[dict, str | None] = ({}, "the upload did not finish")
    """This rank's uploaded files (sizes, SHA-256), or the failure as one line."""
    thread: threading.Thread | None = None

    def uploaded(self) -> bool:
        return self.thread is None or not self.thread.is_alive()


def start_checkpoint(engine, state: TrainState, rank: int, metrics: dict[str, Any], run: storage.Location,
                     extra_files=None) -> PendingCheckpoint:
    """Write this rank's shard of a checkpoint of ``state`` into a local scratch folder (collective: DeepSpeed
    synchronises ranks), then upload it into the folder of ``run`` (``runs.run_location``) on a background thread;
    training goes on meanwhile. ``extra_files`` maps names to local paths copied into the checkpoint (rank 0's
    export). :func:`complete_checkpoint` finishes it."""
    began = time.perf_counter()
    name = _agreed_dir_name(run, state.step)
    directory = tempfile.mkdtemp(prefix=f"rayclip-ckpt-{state.step:08d}-r{rank}-")
    try:
        write_local_checkpoint(engine, state, rank, directory)  # collective (DeepSpeed's own barriers)
        for file_name, path in (extra_files or {}).items():
            shutil.copyfile(path, os.path.join(directory, file_name))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    pending = PendingCheckpoint(state.step, name, run.child(name), metrics, time.perf_counter() - began)

    def upload() -> None:
        try:
            pending.outcome = _upload(directory, pending.target)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    pending.thread = threading.Thread(target=upload, name=f"rayclip-checkpoint-{state.step}", daemon=True)
    pending.thread.start()
    return pending


def uploaded_everywhere(pending: PendingCheckpoint) -> bool:
    """Whether every rank's upload of ``pending`` has ended (collective: a one-number all-reduce, cheap enough to
    ask once a step)."""
    done = torch.tensor([1.0 if pending.uploaded() else 0.0])
    return int(all_reduce_sum(done).item()) == (dist.get_world_size() if dist.is_initialized() else 1)


def complete_checkpoint(pending: PendingCheckpoint, rank: int) -> str:
    """Wait for this rank's upload of ``pending``, then (collective) write the manifest (rank 0, once every rank's
    files are there) and report the checkpoint to Ray Train with the metrics of its step. Returns its URL.

    rayclip uploads the files itself (Ray Train is told ``NO_UPLOAD``) so that the manifest can be written
    after every rank's upload succeeded. A failed upload on any rank removes the folder and raises
    :class:`CheckpointNotSaved` on every rank, naming where it failed.
    """
    import ray.train
    from ray.train import CheckpointUploadMode

    waited_from = time.perf_counter()
    if pending.thread is not None:
        pending.thread.join()
    outcomes = all_gather_objects(pending.outcome)
    failures = [f"rank {r}: {failure}" for r, (_, failure) in enumerate(outcomes) if failure]
    target = pending.target
    if not failures and rank == 0:
        failures = _finish_manifest(target, pending.step, outcomes)
    failures = broadcast_from_chief(failures)
    if failures:
        if rank == 0:
            _remove(target)
        raise CheckpointNotSaved(f"the step-{pending.step} checkpoint was not saved ({failures[0]}); its partial "
                                 f"folder {target.url} was removed")
    storage_context = ray.train.get_context().get_storage()  # Ray Train manages what is on its own filesystem
    name = pending.name
    reported = ray.train.Checkpoint(storage_context.build_checkpoint_path_from_name(name),
                                    storage_context.storage_filesystem)
    ray.train.report(pending.metrics, checkpoint=reported if rank == 0 else None, checkpoint_dir_name=name,
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
    paused_s = pending.paused_s + time.perf_counter() - waited_from
    if rank == 0:
        logger.info("step %d: checkpoint saved to %s (training paused %.2f s for it)", pending.step, target.url,
                    paused_s)
    return target.url


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


def _finish_manifest(target: storage.Location, step: int, outcomes: list) -> list[str]:
    """Rank 0: the merged file table written as the manifest, last; a failure as one line."""
    files = {name: entry for rank_files, _ in outcomes for name, entry in rank_files.items()}
    try:
        runs.write_manifest(target, step, len(outcomes), files)
    except Exception as error:  # noqa: BLE001 (whatever storage raised, the checkpoint is not complete)
        return [f"rank 0: {_write_failure(error, target)}"]
    return []


def _remove(target: storage.Location) -> None:
    try:
        runs.remove_checkpoint(target)
    except OSError as error:
        logger.warning("could not remove the partial checkpoint folder %s (%s)", target.url, error)
