"""A Train worker's side of MLflow (rank 0): opening the run, resizes and what they cost, and the run's close.
Each function takes the ``Worker`` of ``orchestrator.train.worker_loop``.

``jobs/pretrain.py`` creates the run before Ray starts (``tracking.run_id``), so every attempt of a run (a
restart after a lost node, ``--resume``) logs into that one run and the driver can close it whatever
happens to the workers; a run started another way (a Tune trial, a test) has its rank 0 create it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from models import TOWERS, ParameterCounts
from orchestrator import runs, storage
from orchestrator.logs import duration, get_logger

logger = get_logger("train")
UNSENT_FILE = "mlflow_unsent.jsonl"
ERROR_FLUSH_S = 20.0  # after an error, how long rank 0 waits for queued writes before its process ends


def start_tracking(worker, parameters: ParameterCounts):
    """Rank 0 opens (or reopens) the MLflow run; its id goes into every checkpoint. Beside the config, the run's
    params hold the model's trainable and frozen parameter counts (locked towers, fixed temperature)."""
    if not worker.is_chief:
        return None
    from orchestrator.tracking import RunTracker  # mlflow only where it is used: GPU check machines lack it

    cfg = worker.cfg
    tracker = RunTracker.from_config(cfg.tracking)
    worker.state.mlflow_run_id = tracker.start(
        cfg.model_dump(mode="json"),
        cfg.to_yaml(),
        run_name=cfg.tracking.run_name or cfg.name,
        resume_run_id=worker.state.mlflow_run_id or cfg.tracking.run_id,
        world_size=worker.world_size,
        tags=cfg.tracking.tags,
        params={"model.trainable_parameters": str(parameters.total_trainable),
                "model.frozen_parameters": str(parameters.total_frozen),
                **{f"model.{tower}_trainable_parameters": str(parameters.trainable[tower]) for tower in TOWERS}},
    )
    return tracker


def finish_tracking(worker, export_path: str | None, status: str) -> dict[str, Any]:
    """Close the run (the model logged and registered when given) and say what reached MLflow, as report metrics
    the driver prints; metric values that never did are kept beside the run's checkpoints."""
    tracker = worker.tracker
    if tracker is None:
        return {}
    report = tracker.finish(export_path, status=status)
    outcome = {"tracking/run_id": tracker.run_id or "", "tracking/sent_values": report.sent_values,
               "tracking/pending_values": report.pending_values, "tracking/dropped_values": report.dropped_values,
               "tracking/pending": "; ".join(report.pending), "tracking/rejected": "; ".join(report.rejected),
               "tracking/registered_version": tracker.registered_version or "", "tracking/status": status}
    if tracker.unsent_metrics:
        outcome["tracking/unsent_file"] = keep_unsent(worker, tracker.unsent_metrics)
    return outcome


def close_after_error(worker) -> None:
    """Rank 0, when its attempt fails: give queued writes a moment to reach MLflow. A run the job's driver
    created is closed by the driver (a restarted attempt reopens it); one without is marked FAILED here."""
    tracker = worker.tracker
    if tracker is None:
        return
    tracker.flush_timeout_s = min(tracker.flush_timeout_s, ERROR_FLUSH_S)
    if worker.cfg.tracking.run_id is None:
        tracker.finish(None, status="FAILED")
    else:
        tracker.finish(None, status=None)


def keep_unsent(worker, records: list[dict]) -> str:
    """Append metric values MLflow never received to ``<run folder>/mlflow_unsent.jsonl``; returns its URL."""
    cfg = worker.cfg
    location = runs.run_location(cfg.checkpoint.storage_path, cfg.checkpoint.s3_endpoint_url, cfg.name).child(UNSENT_FILE)
    try:
        earlier = storage.read_bytes(location)
    except FileNotFoundError:
        earlier = b""
    storage.write_bytes(location, earlier + "".join(json.dumps(r) + "\n" for r in records).encode())
    return location.url


@dataclass
class Resize:
    """A worker group that resumed a checkpoint of another worker count (an elastic shrink or grow)."""

    from_workers: int
    checkpoint_step: int
    last_step: int | None = None
    """The last step the run logged before the resize, and when (rank 0, from MLflow)."""
    last_step_time: float | None = None


def note_resize(worker, from_workers: int) -> Resize:
    """At a start on another worker count: what it is (and, on rank 0, the last step logged before it)."""
    resize = Resize(from_workers, worker.state.step)
    if worker.tracker is not None:
        last = worker.tracker.last_logged("train/loss")
        if last is not None:
            resize.last_step, resize.last_step_time = last
        logger.info("resized from %d to %d workers: resuming the step-%d checkpoint with the same global batch %d "
                    "(%s)%s", from_workers, worker.world_size, resize.checkpoint_step,
                    worker.cfg.global_batch_size, worker.cfg.describe_batch_plan(worker.world_size),
                    f"; steps {resize.checkpoint_step + 1}-{resize.last_step} are trained again"
                    if resize.last_step and resize.last_step > resize.checkpoint_step else "")
    return resize


def log_resize_cost(worker) -> None:
    """At the first step after a resize: the time it cost, from the last step logged before it (rank 0)."""
    resize, worker.resize = worker.resize, None
    if worker.tracker is None or resize.last_step_time is None:
        return
    lost_s = time.time() - resize.last_step_time
    redone = max(0, (resize.last_step or 0) - resize.checkpoint_step)
    logger.info("resize %d -> %d workers cost %s (from step %d's log line to step %d, %d step(s) redone)",
                resize.from_workers, worker.world_size, duration(lost_s), resize.last_step, worker.state.step, redone)
    worker.tracker.log_metrics({"scaling/resize_seconds_lost": lost_s, "scaling/resize_steps_redone": float(redone)},
                               worker.state.step, at_redone_step=True)


@dataclass
class Pace:
    """The time this worker group spent between steps on evaluations and checkpoints, for the ETA: the logged
    rate counts those pauses (what the run really did), the ETA spreads them over the steps to come."""

    first_step: int
    paused_s: float = 0.0

    def paused(self, seconds: float) -> float:
        self.paused_s += seconds
        return seconds

    def eta_s(self, step: int, stop_step: int, step_s: float) -> float:
        """Seconds to ``stop_step``: the steps left at the training pace ``step_s`` (seconds a step, pauses
        excluded), plus pauses at the rate per step they came so far in this attempt."""
        return (stop_step - step) * (step_s + self.paused_s / max(step - self.first_step, 1))
