"""MLflow tracking for one pretraining job, called on rank 0 only.

One MLflow run per job: the flattened config as params, the YAML as `config.yaml`, training metrics,
evaluations with plots, and the exported OpenAI-layout state dict registered as a model
version. Tracking is an observer, never a dependency of training: every write goes through an
:class:`~orchestrator.tracking.outbox.Outbox`, which sends it in the background and, while the store does
not answer, keeps it and retries with backoff. An outage of minutes loses nothing; at the end, `finish`
waits up to ``flush_timeout_s`` for what is still queued and says what did not reach the store.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from orchestrator import noise
from orchestrator.logs import get_logger
from orchestrator.tracking.experiments import default_artifact_location, ensure_experiment
from orchestrator.tracking.outbox import Outbox, OutboxReport, is_transient, short_reason
from orchestrator.tracking.run_lifecycle import HTTP_ENV_DEFAULTS, register_model, run_tags
from orchestrator.tracking.params import flatten_config, param_batches, truncate
from orchestrator.tracking.evaluation import (
    HEADLINE_METRIC,
    EvaluationResult,
    check_evaluation,
    evaluation_figures,
    evaluation_metrics,
    headline_key,
)

logger = get_logger("tracking")

_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


class TrackingSettings(Protocol):
    """The `tracking` config section as this module reads it (the pydantic model fits)."""

    uri: str
    experiment: str
    run_name: str | None
    register_model_name: str | None
    log_every_steps: int
    system_metrics: bool
    artifact_location: str | None


class RunTracker:
    """Rank-0 MLflow logger for one pretraining job (also the evaluation and search drivers' run).

    Every write is queued and sent in the background (see :mod:`orchestrator.tracking.outbox`), so a call
    returns at once whether the store answers or not. The caller decides when to log (`should_log(step)`
    applies `log_every_steps`); `log_metrics` logs what it is given. After a restart, values of steps the run
    had already logged (``progress_metric``'s last step) are not logged again: redone steps appear once.
    """

    def __init__(
        self,
        *,
        uri: str = "sqlite:///mlflow.db",
        experiment: str = "rayclip",
        run_name: str | None = None,
        register_model_name: str | None = None,
        log_every_steps: int = 1,
        system_metrics: bool = False,
        system_metrics_interval_s: float = 10.0,
        artifact_location: str | None = None,
        flush_timeout_s: float = 300.0,
        start_wait_s: float = 15.0,
        progress_metric: str = "train/loss",
    ) -> None:
        self.uri = uri
        self.artifact_location = artifact_location
        self.experiment = experiment
        self.run_name = run_name
        self.register_model_name = register_model_name
        self.log_every_steps = max(1, log_every_steps)
        self.system_metrics = system_metrics
        self.system_metrics_interval_s = system_metrics_interval_s
        self.flush_timeout_s = flush_timeout_s
        self.start_wait_s = start_wait_s
        self.progress_metric = progress_metric
        self.run_id: str | None = None
        self.registered_version: str | None = None
        self.report: OutboxReport | None = None
        """What reached the store and what did not, once `finish` returned."""
        self.unsent_metrics: list[dict] = []
        """The metric values that never reached the store (after `finish`), to keep in a file."""
        self.non_finite_skipped: dict[str, int] = {}
        self.evaluation_history: dict[str, list[tuple[int, float]]] = {}
        self._outbox: Outbox | None = None
        self._scratch: str | None = None
        self._monitor = None
        if uri.startswith(("http://", "https://")):
            for name, value in HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(name, value)

    @classmethod
    def from_config(cls, tracking_cfg: TrackingSettings, **overrides: Any) -> RunTracker:
        """Build from the `tracking` config section (any object with its attribute names)."""
        fields = dict(
            uri=tracking_cfg.uri,
            experiment=tracking_cfg.experiment,
            run_name=tracking_cfg.run_name,
            register_model_name=tracking_cfg.register_model_name,
            log_every_steps=tracking_cfg.log_every_steps,
            system_metrics=tracking_cfg.system_metrics,
            artifact_location=tracking_cfg.artifact_location,
        )
        if getattr(tracking_cfg, "flush_timeout_s", None) is not None:
            fields["flush_timeout_s"] = tracking_cfg.flush_timeout_s
        return cls(**{**fields, **overrides})

    @property
    def active(self) -> bool:
        """True between `start` (or `attach`) and `finish`."""
        return self._outbox is not None

    @property
    def disabled(self) -> bool:
        """True when something the job logged did not reach the store (known after `finish`)."""
        report = self.report
        return report is not None and bool(report.pending_values or report.pending or report.rejected or
                                           report.dropped_values or self.run_id is None)

    def should_log(self, step: int) -> bool:
        """Whether `step` falls on the configured metric logging interval."""
        return step % self.log_every_steps == 0

    def _client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def _open_outbox(self) -> None:
        self._outbox = Outbox(self._client, self.uri, lambda: self.run_id)
        self._scratch = tempfile.mkdtemp(prefix="rayclip-mlflow-")

    def start(
        self,
        config_dict: Mapping[str, Any],
        config_yaml: str,
        run_name: str | None = None,
        resume_run_id: str | None = None,
        *,
        world_size: int | None = None,
        tags: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> str | None:
        """Open (or, with `resume_run_id`, reopen) the job's run and log config, YAML, tags and `params` (facts
        no config field states, e.g. the model's trainable and frozen parameter counts).

        Returns the run id to persist with checkpoints so a restarted job continues the same run. It waits up
        to a few seconds for the store; one that does not answer gets the run later (None is returned then,
        and `run_id` is set once it exists).
        """
        noise.install(noise.TRACKING)
        self._open_outbox()
        self.run_id = resume_run_id
        tags_of_run = run_tags(config_dict, world_size, tags)
        self._outbox.put("the run's start (config, params, tags)", lambda client: self._open_run(
            client, run_name or self.run_name, config_dict, config_yaml, tags_of_run, params or {}))
        self._outbox.flush(self.start_wait_s)
        return self.run_id

    def _open_run(self, client: MlflowClient, run_name: str | None, config_dict: Mapping[str, Any], config_yaml: str,
                  tags: Mapping[str, str], extra_params: Mapping[str, str]) -> None:
        resumed = self.run_id is not None and self._reopen(client, self.run_id)
        if not resumed:
            experiment_id = ensure_experiment(client, self.experiment,
                                              self.artifact_location or default_artifact_location(self.uri))
            self.run_id = client.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id
        params = {**flatten_config(config_dict), **extra_params}
        if resumed:
            params = self._new_params(client, params)
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        for batch in param_batches(params):
            client.log_batch(self.run_id, params=batch)
        client.log_text(self.run_id, config_yaml, "config.yaml")
        if self.system_metrics and self._monitor is None:
            self._start_system_metrics(resume=resumed)

    def _reopen(self, client: MlflowClient, run_id: str) -> bool:
        """Mark an earlier run RUNNING again and note the last step it logged; False (and a new run) if this store
        never had it."""
        try:
            client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            logger.warning("MLflow run %s not found at %s; starting a new run.", run_id, self.uri)
            self.run_id = None
            return False
        client.update_run(run_id, status="RUNNING")
        history = client.get_metric_history(run_id, self.progress_metric)
        self._outbox.skip_through_step = max((m.step for m in history), default=None)
        return True

    def _new_params(self, client: MlflowClient, params: dict[str, str]) -> dict[str, str]:
        logged = client.get_run(self.run_id).data.params
        changed = sorted(k for k in params.keys() & logged.keys() if truncate(params[k]) != logged[k])
        if changed:
            logger.warning(
                "Resumed MLflow run %s keeps its original values for changed params %s; "
                "config.yaml holds the new config.", self.run_id, ", ".join(changed),
            )
        return {k: v for k, v in params.items() if k not in logged}

    def _start_system_metrics(self, resume: bool) -> None:
        """Start MLflow's CPU/GPU/disk/network sampler thread for this run."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=self.system_metrics_interval_s,
            resume_logging=resume,
            tracking_uri=self.uri,
        )
        self._monitor.start()

    def _stop_system_metrics(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor._shutdown_event.set()  # its last sample is not worth waiting on a store that may be gone

    def log_metrics(self, metrics: Mapping[str, float], step: int, *, at_redone_step: bool = False) -> None:
        """Queue one step's scalars; non-finite values are skipped and counted, never sent.

        A NaN loss is something to see, not to crash on: the count of skipped values goes out
        as `tracking/non_finite_skipped` so the step where it happened is visible in the UI.
        Values of a step logged before a restart are not sent again, unless ``at_redone_step`` says they
        describe the restart itself (what a resize cost is known only at a redone step).
        """
        if not self.active:
            return
        finite = self._finite_only(metrics, step)
        timestamp_ms = int(time.time() * 1000)
        entries = [Metric(k, v, timestamp_ms, step) for k, v in finite.items()]
        if len(finite) < len(metrics):
            total = float(sum(self.non_finite_skipped.values()))
            entries.append(Metric("tracking/non_finite_skipped", total, timestamp_ms, step))
        self._outbox.put_metrics(entries, at_redone_steps=at_redone_step)

    def _finite_only(self, metrics: Mapping[str, float], step: int) -> dict[str, float]:
        finite = {}
        for key, value in metrics.items():
            value = float(value)
            if math.isfinite(value):
                finite[key] = value
                continue
            count = self.non_finite_skipped.get(key, 0) + 1
            self.non_finite_skipped[key] = count
            logger.warning(
                "Skipping non-finite metric %s=%s at step %d (%d skipped for this key so far).",
                key, value, step, count,
            )
        return finite

    def log_evaluation(self, result: EvaluationResult, step: int, extra_metrics: Mapping[str, float] | None = None) -> None:
        """Log one set's evaluation at ``step``: its metrics (``eval/<set>/...``, plus ``extra_metrics``) and
        figures under ``eval/<set>/``; the headline curve is redrawn from the whole history, steps logged
        before a restart included. The figures are drawn by the outbox's thread, off the training path."""
        if result.set_name not in self.evaluation_history:
            self.evaluation_history[result.set_name] = self._load_history(headline_key(result))
        history = self.evaluation_history[result.set_name] + [(step, float(result.metrics[HEADLINE_METRIC[result.task]]))]
        check_evaluation(result)  # a bad result fails here, tracking or not
        self.evaluation_history[result.set_name] = history
        self.log_metrics({**evaluation_metrics(result), **(extra_metrics or {})}, step)
        if not self.active:
            return
        scratch, outbox = self._scratch, self._outbox

        def upload(client: MlflowClient) -> None:
            skip = outbox.skip_through_step
            if skip is not None and step <= skip:
                return
            folder = Path(tempfile.mkdtemp(dir=scratch))
            try:
                for name, figure in evaluation_figures(result, step, history).items():
                    figure.savefig(folder / name, dpi=100)
                client.log_artifacts(self.run_id, str(folder), f"eval/{result.set_name}")
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        self._outbox.put(f"the plots of {result.set_name} at step {step}", upload)

    def _load_history(self, key: str) -> list[tuple[int, float]]:
        """``key``'s logged (step, value) pairs; empty when the store does not answer (the curve then starts here)."""
        if self.run_id is None:
            return []
        try:
            return [(m.step, m.value) for m in self._client().get_metric_history(self.run_id, key)]
        except Exception as error:  # noqa: BLE001 (a curve without its past is better than no curve)
            if not is_transient(error):
                raise
            return []

    def last_logged(self, key: str) -> tuple[int, float] | None:
        """(step, wall-clock seconds) of ``key``'s latest value in the run; None when it has none or the store
        does not answer."""
        if self.run_id is None:
            return None
        try:
            history = self._client().get_metric_history(self.run_id, key)
        except Exception as error:  # noqa: BLE001
            if not is_transient(error):
                raise
            return None
        latest = max(history, key=lambda m: (m.step, m.timestamp), default=None)
        return None if latest is None else (latest.step, latest.timestamp / 1000)

    def log_file(self, path: str, artifact_dir: str | None = None) -> None:
        """Upload one local file as an artifact of the run (a copy is queued: the file may go away)."""
        if not self.active:
            return
        copy = Path(tempfile.mkdtemp(dir=self._scratch)) / Path(path).name
        shutil.copyfile(path, copy)
        self._outbox.put(f"the file {Path(path).name}",
                         lambda client: client.log_artifact(self.run_id, str(copy), artifact_dir))

    def attach(self, run_id: str) -> bool:
        """Log into an existing run without changing its status (an evaluation of a finished training run);
        False when the store does not have it or does not answer."""
        try:
            self._client().get_run(run_id)
        except Exception as error:  # noqa: BLE001
            if isinstance(error, MlflowException) and error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            if not is_transient(error):
                raise
            logger.warning("MLflow at %s does not answer (%s); nothing is logged there", self.uri, short_reason(error))
            return False
        self.run_id = run_id
        self._open_outbox()
        return True

    def finish(self, exported_model_path: str | None, status: str | None = "FINISHED") -> OutboxReport | None:
        """Log the exported state dict under `model/`, register it, close the run with ``status`` (None leaves it
        as it is: another process closes it), and wait up to ``flush_timeout_s`` for everything queued. Returns
        what reached the store and what did not."""
        if status is not None and status not in _RUN_STATUSES:
            raise ValueError(f"status must be one of {_RUN_STATUSES}, got {status!r}")
        if not self.active:
            return self.report
        self._stop_system_metrics()
        if exported_model_path is not None:
            model = Path(tempfile.mkdtemp(dir=self._scratch)) / Path(exported_model_path).name
            shutil.copyfile(exported_model_path, model)
            self._outbox.put("the exported model", lambda client: self._log_model(client, model))
        if status is not None:
            self._outbox.put(f"the run's status ({status})",
                             lambda client: client.set_terminated(self.run_id, status=status))
        outbox, self._outbox = self._outbox, None
        self.report = outbox.close(self.flush_timeout_s)
        self.unsent_metrics = outbox.pending_metrics()
        shutil.rmtree(self._scratch, ignore_errors=True)
        return self.report

    def _log_model(self, client: MlflowClient, path: Path) -> None:
        """Upload the exported state dict under `model/` and register it (once, also when a retry repeats this)."""
        client.log_artifact(self.run_id, str(path), "model")
        if self.register_model_name and self.registered_version is None:
            self.registered_version = register_model(client, self.register_model_name, self.run_id, path.name)
