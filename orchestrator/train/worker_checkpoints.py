"""A training worker's checkpoints: saved at a step, uploaded while training goes on, completed once uploaded.

``worker`` is the training loop's ``Worker`` (``orchestrator.train.worker_loop``); the checkpoint itself is
``checkpoint_upload``'s.
"""

from __future__ import annotations

from typing import Any

from orchestrator import runs
from orchestrator.train.checkpoint_upload import complete_checkpoint, start_checkpoint, uploaded_everywhere


def reported_metrics(worker) -> dict[str, Any]:
    """What reports to Ray Train (and Ray Tune's schedulers) carry: the step, and the last logged metrics."""
    state = worker.state
    return {"step": state.step, "samples_seen": state.samples_seen, "mlflow_run_id": state.mlflow_run_id,
            **worker.last_metrics}


def save(worker, extra_files: dict[str, str] | None = None, *, background: bool = False) -> None:
    """A checkpoint of this step (collective), after the one still uploading is complete; the MLflow run id goes
    along once the store has given one. With ``background`` it is left uploading (``finish_checkpoint``)."""
    finish_checkpoint(worker)
    if worker.tracker is not None and worker.tracker.run_id:
        worker.state.mlflow_run_id = worker.tracker.run_id
    cfg = worker.cfg
    run = runs.run_location(cfg.checkpoint.storage_path, cfg.checkpoint.s3_endpoint_url, cfg.name)
    worker.pending_checkpoint = start_checkpoint(worker.engine, worker.state, worker.rank, reported_metrics(worker),
                                                 run, extra_files)
    if not background:
        finish_checkpoint(worker)


def finish_checkpoint(worker) -> None:
    """The checkpoint still uploading, if any, completed and reported (collective; waits for the upload)."""
    pending, worker.pending_checkpoint = worker.pending_checkpoint, None
    if pending is not None:
        complete_checkpoint(pending, worker.rank)
        worker.saved_step = pending.step


def finish_checkpoint_if_uploaded(worker) -> None:
    """Collective, once a step: complete the checkpoint still uploading once every rank's upload has ended."""
    if worker.pending_checkpoint is not None and uploaded_everywhere(worker.pending_checkpoint):
        finish_checkpoint(worker)
