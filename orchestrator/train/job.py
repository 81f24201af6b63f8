"""The driver of a pretraining job (``jobs/pretrain.py``, ``jobs/demo.py``): what happens before Ray starts, the
fit under Ctrl-C, and what the job prints at its end.

Before Ray (:func:`prepare_run`, every failure one line and exit code 2): the run gets a name no other run has
and its folder is reserved, or ``--resume`` finds the checkpoint it continues from; the inputs are checked; the
tracking store must answer and the MLflow run is created, so every attempt of the run logs into that one run.
During the fit (:func:`fit`): the first Ctrl-C (or SIGTERM) asks the workers to checkpoint at the next step and
stop; a second one, or ``checkpoint.stop_timeout_s``, stops at once. At the end (:func:`conclude`): where the
model, checkpoints and MLflow run are, what reached MLflow, and how to resume when the run did not finish.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator import runs
from orchestrator.config import ConfigError, RunConfig
from orchestrator.failures import RunStopped
from orchestrator.logs import get_logger
from orchestrator.runs import EXPORT_FILE
from orchestrator.train.checkpoint import NoIntactCheckpoint, resume_point, saved_state
from orchestrator.train.launch import build_trainer, check_inputs, init_ray, name_run
from orchestrator.train.run_control import start_control

logger = get_logger("train")
EXIT_INTERRUPTED = 130  # the shell's code for a job ended by Ctrl-C


def prepare_run(cfg: RunConfig, resume: str | None = None, from_step: int | None = None) -> RunConfig:
    """Everything before Ray starts; raises :class:`ConfigError` (one line, exit 2) on any problem."""
    if from_step is not None and resume is None:
        raise ConfigError("--from-step needs --resume RUN_NAME (the run whose checkpoint of that step to continue)")
    cfg = name_run(cfg, resume)  # first: the name's time is when the job started, not when its imports ended
    from orchestrator.tracking import create_run  # MLflow: imported once the name is taken
    check_inputs(cfg)
    run = runs.run_location(cfg.checkpoint.storage_path, cfg.checkpoint.s3_endpoint_url, cfg.name)
    run_id = _check_resume(cfg, run, from_step) if resume else None
    check_tracking(cfg, "train and log once it answers")
    if resume is None:
        _reserve(cfg, run)
    if run_id is None:
        try:
            run_id = create_run(cfg.tracking, cfg.name, cfg.model_dump(mode="json"))
        except Exception as error:  # noqa: BLE001 (the workers create it when the store answers later)
            if cfg.tracking.required:
                raise ConfigError(f"tracking.uri={cfg.tracking.uri!r}: the MLflow run could not be created "
                                  f"({str(error).splitlines()[0][:200]})") from None
    if run_id is not None:
        runs.update_record(run, mlflow_run_id=run_id, tracking_uri=cfg.tracking.uri)
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"run_id": run_id})})


def check_tracking(cfg: RunConfig, without: str) -> None:
    """The tracking store must answer (``tracking.required``); raises :class:`ConfigError` naming ``tracking.uri``
    and what ``tracking.required=false`` would do instead (``without``)."""
    from orchestrator.tracking import TrackingUnreachable, check_store

    try:
        check_store(cfg.tracking.uri)
    except TrackingUnreachable as error:
        if cfg.tracking.required:
            raise ConfigError(f"tracking.uri={cfg.tracking.uri!r}: {error}: start it, point tracking.uri at one "
                              f"that answers, or set tracking.required=false to {without}") from None
        logger.warning("%s: going on without it (tracking.required=false)", error)


def _reserve(cfg: RunConfig, run) -> None:
    try:
        runs.reserve(run, {"name": cfg.name})
    except runs.RunFolderTaken:
        raise ConfigError(f"a run folder {run.url} exists already: a new run never writes into another run's folder; "
                          f"continue that run with --resume {cfg.name}") from None


def _check_resume(cfg: RunConfig, run, from_step: int | None) -> str | None:
    """The checkpoint ``--resume`` continues from, said in one line (and each damaged newer one passed over);
    returns the run's MLflow run id."""
    if from_step is not None:
        candidates = [c for c in runs.list_checkpoints(run) if c.step == from_step]
        intact = [c for c in candidates if c.problem is None]
        if not intact:
            steps = sorted({c.step for c in runs.list_checkpoints(run) if c.problem is None})
            why = f"its checkpoint is not usable ({candidates[-1].problem})" if candidates else "no checkpoint of that step"
            raise ConfigError(f"--from-step {from_step}: {why}; intact checkpoints of {cfg.name}: steps "
                              f"{', '.join(map(str, steps)) or 'none'}")
        runs.update_record(run, pinned={"step": from_step, "at": time.time(), "checkpoint": intact[-1].name})
    try:
        chosen = resume_point(cfg, settle=True)
    except NoIntactCheckpoint as error:
        raise ConfigError(f"--resume {cfg.name}: {error}") from None
    if chosen is None:
        raise ConfigError(f"--resume {cfg.name}: the run has no checkpoint yet (start a new run instead)")
    logger.info("resuming %s from %s (step %d)%s", cfg.name, chosen.name, chosen.step,
                "" if chosen.verified else ", a checkpoint written before manifests (not verified)")
    return saved_state(chosen).mlflow_run_id or runs.read_record(run).get("mlflow_run_id")


@dataclass
class FitOutcome:
    """How ``fit`` ended: Ray Train's result, or the error, and whether the job was interrupted."""

    result: Any = None
    error: BaseException | None = None
    end: dict = field(default_factory=dict)
    """Rank 0's end report (``run_control``): what reached MLflow, whether the run stopped on request."""
    interrupted: bool = False
    aborted: bool = False
    """Interrupted and stopped without waiting for the workers' checkpoint (a second Ctrl-C, or the timeout)."""
    notes: list[str] = field(default_factory=list)


def start_and_fit(cfg: RunConfig) -> FitOutcome:
    """Start (or join) Ray, then :func:`fit`; a Ctrl-C while Ray starts ends the job as an interrupted one."""
    try:
        init_ray(cfg)
    except KeyboardInterrupt:
        return FitOutcome(interrupted=True, aborted=True)
    return fit(cfg)


def fit(cfg: RunConfig) -> FitOutcome:
    """Run the trainer to its end; Ctrl-C / SIGTERM ask it to checkpoint and stop (see the module docstring)."""
    control = start_control(cfg.name)
    outcome = FitOutcome()

    done = threading.Event()

    def run() -> None:
        try:
            outcome.result = build_trainer(cfg).fit()
        except BaseException as error:  # noqa: BLE001 (handed to the main thread)
            outcome.error = error
        finally:
            done.set()

    # The main thread waits on an Event: a Ctrl-C inside Thread.join() can leave the thread marked as ended
    # while it still runs (CPython's bpo-45274 handling), an Event's wait has no such state.
    thread = threading.Thread(target=run, name="rayclip-fit", daemon=True)
    # Set for SIGINT too: a job started in the background by a script inherits SIGINT ignored.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    interrupted_at = None
    try:
        thread.start()
        while not done.is_set():
            try:
                done.wait(0.5)
                if interrupted_at is not None and time.monotonic() - interrupted_at > cfg.checkpoint.stop_timeout_s:
                    logger.warning("no checkpoint within checkpoint.stop_timeout_s=%g s: stopping now",
                                   cfg.checkpoint.stop_timeout_s)
                    outcome.aborted = True
                    break
            except KeyboardInterrupt:
                if interrupted_at is not None:
                    outcome.aborted = True
                    break
                interrupted_at, outcome.interrupted = time.monotonic(), True
                control.request_stop.remote("interrupted")
                logger.info("interrupted: the workers save a checkpoint at the next step and stop (at most %s); "
                            "press Ctrl-C again to stop at once", _seconds(cfg.checkpoint.stop_timeout_s))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not outcome.aborted:
        import ray

        outcome.end = ray.get(control.end_report.remote(), timeout=60)
    return outcome


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (a scheduler, `ray job stop`) is handled as Ctrl-C is


def _seconds(value: float) -> str:
    return f"{value:g} s"


def conclude(cfg: RunConfig, outcome: FitOutcome) -> tuple[list[str], int]:
    """What the job prints at its end, and its exit code; closes the MLflow run when the workers could not."""
    resume = f"python jobs/pretrain.py --resume {cfg.name}"
    if outcome.aborted or outcome.error is not None:
        _close_tracking(cfg, "KILLED" if outcome.interrupted else "FAILED")
        last = _last_checkpoint_step(cfg)
        where = f"; resume from step {last} with: {resume}" if last is not None else ""
        if outcome.aborted:
            return [f"stopped without a new checkpoint{where}"], EXIT_INTERRUPTED
        stopped = _run_stopped(outcome.error)
        reason = stopped.reason if stopped else f"{type(outcome.error).__name__}: {_first_line(outcome.error)}"
        return [f"error: run {cfg.name} stopped: {reason}{where}"], 1
    end = outcome.end
    lines = describe_result(cfg, outcome.result, end)
    step, stop_step = end.get("step", 0), cfg.schedule.stop_after_steps or cfg.schedule.total_steps
    if end.get("stopped"):
        saved = end.get("checkpoint_step", -1)
        lines.append(f"stopped at step {step} of {cfg.schedule.total_steps} (checkpoint saved); resume with: {resume}"
                     if saved > 0 else f"stopped at step {step} of {cfg.schedule.total_steps}, before any checkpoint: "
                     "nothing to resume (start the run again)")
        return lines, EXIT_INTERRUPTED
    if step < stop_step:
        lines.append(f"error: the run ended at step {step} of {stop_step}: the data stream ran out (see the data lines "
                     f"above); its model was not registered; resume with: {resume}")
        return lines, 1
    if step < cfg.schedule.total_steps:
        lines.append(f"stopped after {step} of {cfg.schedule.total_steps} steps (schedule.stop_after_steps); "
                     f"continue with: {resume}")
    return lines, 0


def describe_result(cfg: RunConfig, result, end: dict) -> list[str]:
    """Where the model, checkpoints and MLflow run are, what reached MLflow (rank 0's ``end`` report), and the
    accuracy (the last checkpoint's metrics)."""
    metrics = result.metrics or {}
    checkpoint = result.checkpoint.path if result.checkpoint else None
    step = end.get("step", metrics.get("step", 0))
    lines = [f"run: {cfg.name} ({step}/{cfg.schedule.total_steps} steps)", f"checkpoints: {result.path}"]
    if checkpoint and step >= (cfg.schedule.stop_after_steps or cfg.schedule.total_steps) and not end.get("stopped"):
        lines.append(f"exported model (OpenAI state-dict layout): {checkpoint}/{EXPORT_FILE}")
    lines += tracking_lines(cfg, end)
    loss = metrics.get("train/loss", (metrics.get("train") or {}).get("loss"))  # Ray may nest "a/b" keys
    if loss is not None:
        lines.append(f"final train loss: {loss:.4f}")
    if "zero_shot_top1" in metrics:
        lines.append(f"zero-shot top-5: {metrics['zero_shot_top5']:.3f}")
        lines.append(f"zero-shot top-1: {metrics['zero_shot_top1']:.3f}")
    return lines


def tracking_lines(cfg: RunConfig, end: dict) -> list[str]:
    """What reached MLflow, from rank 0's end report (``worker_tracking.finish_tracking``)."""
    tracking = {key.removeprefix("tracking/"): value for key, value in end.items() if key.startswith("tracking/")}
    run_id = tracking.get("run_id") or cfg.tracking.run_id
    if not run_id:
        return [f"MLflow: nothing reached {cfg.tracking.uri} (it never answered); "
                f"{tracking.get('pending_values', 0)} metric values kept in {tracking.get('unsent_file', 'no file')}"]
    lines = [f"MLflow: experiment {cfg.tracking.experiment!r}, run {run_id} at {cfg.tracking.uri}",
             f"MLflow UI: {mlflow_ui_command(cfg)}"]
    missing = []
    if tracking.get("pending_values") or tracking.get("dropped_values"):
        missing.append(f"{tracking.get('pending_values', 0) + tracking.get('dropped_values', 0)} metric values"
                       + (f" (kept in {tracking['unsent_file']})" if tracking.get("unsent_file") else ""))
    if tracking.get("pending"):
        missing.append(tracking["pending"])
    if tracking.get("rejected"):
        missing.append(f"rejected by the store: {tracking['rejected']}")
    if missing:
        lines.append(f"MLflow did not receive: {'; '.join(missing)}")
    elif tracking:
        lines.append(f"MLflow received everything the run logged ({tracking.get('sent_values', 0)} metric values, its files)")
    if tracking.get("registered_version"):
        lines.append(f"MLflow model registry: {cfg.tracking.register_model_name!r} version {tracking['registered_version']}")
    elif cfg.tracking.register_model_name:
        lines.append(f"MLflow model registry: nothing registered (only a run that finishes its schedule is)")
    return lines


def mlflow_ui_command(cfg: RunConfig) -> str:
    """How to look at the run: a server URI is opened in a browser, a local store needs ``mlflow ui``."""
    uri = cfg.tracking.uri
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000"


def _close_tracking(cfg: RunConfig, status: str) -> None:
    from orchestrator.tracking import end_run

    if cfg.tracking.run_id and not end_run(cfg.tracking.uri, cfg.tracking.run_id, status):
        logger.warning("MLflow at %s does not answer: run %s stays RUNNING there", cfg.tracking.uri, cfg.tracking.run_id)


def _last_checkpoint_step(cfg: RunConfig) -> int | None:
    run = runs.run_location(cfg.checkpoint.storage_path, cfg.checkpoint.s3_endpoint_url, cfg.name)
    chosen, _ = runs.resume_checkpoint(run)
    return chosen.step if chosen else None


def _run_stopped(error: BaseException | None) -> RunStopped | None:
    while error is not None:
        if isinstance(error, RunStopped):
            return error
        error = getattr(error, "controller_failure", None) or error.__cause__
    return None


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
