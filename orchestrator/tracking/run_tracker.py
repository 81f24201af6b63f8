"""MLflow tracking for one pretraining job, called on rank 0 only.

One MLflow run per job: the flattened config as params, the YAML as `config.yaml`, training metrics,
evaluations with plots, and the exported OpenAI-layout state dict registered as a model
version. Tracking is an observer, never a dependency of training: if the store is unreachable or
rejects a call, `RunTracker` logs one warning naming the URI and turns into a no-op for the rest of
the job, so a multi-day run never dies because MLflow went down.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from orchestrator.logs import drop_records, get_logger
from orchestrator.tracking.experiments import default_artifact_location, ensure_experiment
from orchestrator.tracking.params import flatten_config, param_batches, truncate
from orchestrator.tracking.evaluation import (
    HEADLINE_METRIC,
    EvaluationResult,
    evaluation_figures,
    evaluation_metrics,
    headline_key,
)

logger = get_logger("tracking")

# MLflow's defaults (7 retries, 120 s timeout) make a dead server cost minutes per call. These
# defaults still retry a blip but give up in seconds; an operator's own env settings win.
_HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
_HEALTH_PROBE_TIMEOUT_S = 5.0
# SQLAlchemyError: a local sqlite store left half-created by a killed run fails with it, not MlflowException.
_TRACKING_ERRORS = (MlflowException, requests.RequestException, OSError, SQLAlchemyError)
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


def _probe_http(uri: str, timeout_s: float) -> None:
    """Raise OSError fast if nothing answers at `uri`; any HTTP reply (even 404) counts as up.

    A black-holed host would otherwise cost MLflow's full retry budget before the first warning.
    """
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return


class RunTracker:
    """Rank-0 MLflow logger for one pretraining job; every method is a no-op once tracking fails.

    The caller decides when to log (`should_log(step)` applies `log_every_steps`); `log_metrics`
    logs what it is given.
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
    ) -> None:
        self.uri = uri
        self.artifact_location = artifact_location
        self.experiment = experiment
        self.run_name = run_name
        self.register_model_name = register_model_name
        self.log_every_steps = max(1, log_every_steps)
        self.system_metrics = system_metrics
        self.system_metrics_interval_s = system_metrics_interval_s
        self.run_id: str | None = None
        self.disabled = False
        self.non_finite_skipped: dict[str, int] = {}
        self.evaluation_history: dict[str, list[tuple[int, float]]] = {}
        self._client: MlflowClient | None = None
        self._monitor = None
        if uri.startswith(("http://", "https://")):
            for name, value in _HTTP_ENV_DEFAULTS.items():
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
        return cls(**{**fields, **overrides})

    @property
    def active(self) -> bool:
        """True while a run is open and tracking has not been disabled."""
        return self.run_id is not None and not self.disabled

    def should_log(self, step: int) -> bool:
        """Whether `step` falls on the configured metric logging interval."""
        return step % self.log_every_steps == 0

    @contextlib.contextmanager
    def _guarded(self, action: str) -> Iterator[None]:
        """Turn a tracking failure into one warning and a permanent no-op, never an exception."""
        try:
            yield
        except _TRACKING_ERRORS as exc:
            self._disable(action, exc)

    def _disable(self, action: str, exc: BaseException) -> None:
        if self.disabled:
            return
        self.disabled = True
        logger.warning(
            "MLflow tracking at %s failed while trying to %s (%s: %s); training continues "
            "without tracking for the rest of this job.",
            self.uri, action, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
        )
        self._stop_system_metrics(flush=False)

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

        Returns the run id to persist with checkpoints so a restarted job continues the same run,
        or None if tracking is unavailable.
        """
        if self.disabled:
            return None
        with self._guarded(f"start a run in experiment {self.experiment!r}"):
            if self.uri.startswith(("http://", "https://")):
                _probe_http(self.uri, _HEALTH_PROBE_TIMEOUT_S)
            # A new local store announces its table creation and migrations: routine, not news.
            drop_records("mlflow.store.db.utils", "Creating initial MLflow database tables", "Updating database tables")
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            run_tags = _run_tags(config_dict, world_size, tags)
            resumed = resume_run_id is not None and self._reopen(resume_run_id)
            if not resumed:
                self._create_run(run_name or self.run_name, run_tags)
            self._log_config(config_dict, config_yaml, run_tags, resumed, params or {})
            if self.system_metrics:
                self._start_system_metrics(resume=resumed)
            return self.run_id
        return None

    def _create_run(self, run_name: str | None, tags: Mapping[str, str]) -> None:
        experiment_id = self._experiment_id()
        run = self._client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
        self.run_id = run.info.run_id

    def _experiment_id(self) -> str:
        location = self.artifact_location or default_artifact_location(self.uri)
        return ensure_experiment(self._client, self.experiment, location)

    def _reopen(self, run_id: str) -> bool:
        """Mark an earlier run RUNNING again; False (and a new run) if this store never had it."""
        try:
            self._client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            logger.warning("MLflow run %s not found at %s; starting a new run.", run_id, self.uri)
            return False
        self._client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        return True

    def _log_config(
        self, config_dict: Mapping[str, Any], config_yaml: str, tags: Mapping[str, str], resumed: bool,
        extra_params: Mapping[str, str]) -> None:
        """Log params (on resume only the new keys: MLflow params are immutable), YAML and tags."""
        params = {**flatten_config(config_dict), **extra_params}
        if resumed:
            params = self._new_params(params)
            self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        for batch in param_batches(params):
            self._client.log_batch(self.run_id, params=batch)
        self._client.log_text(self.run_id, config_yaml, "config.yaml")

    def _new_params(self, params: dict[str, str]) -> dict[str, str]:
        logged = self._client.get_run(self.run_id).data.params
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

    def _stop_system_metrics(self, flush: bool = True) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        if flush:
            monitor.finish()
        else:  # the store is gone: stop the sampler without finish()'s flush to a dead server
            monitor._shutdown_event.set()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log one step's scalars; non-finite values are skipped and counted, never sent.

        A NaN loss is something to see, not to crash on: the count of skipped values goes out
        as `tracking/non_finite_skipped` so the step where it happened is visible in the UI.
        """
        if not self.active:
            return
        finite = self._finite_only(metrics, step)
        timestamp_ms = int(time.time() * 1000)
        entries = [Metric(k, v, timestamp_ms, step) for k, v in finite.items()]
        if len(finite) < len(metrics):
            total = float(sum(self.non_finite_skipped.values()))
            entries.append(Metric("tracking/non_finite_skipped", total, timestamp_ms, step))
        with self._guarded(f"log metrics at step {step}"):
            self._client.log_batch(self.run_id, metrics=entries)

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
        before a restart included."""
        if result.set_name not in self.evaluation_history:
            self.evaluation_history[result.set_name] = self._load_history(headline_key(result))
        history = self.evaluation_history[result.set_name] + [(step, float(result.metrics[HEADLINE_METRIC[result.task]]))]
        figures = evaluation_figures(result, step, history)  # a bad result fails here, tracking or not
        self.evaluation_history[result.set_name] = history
        self.log_metrics({**evaluation_metrics(result), **(extra_metrics or {})}, step)
        if not self.active:
            return
        with self._guarded(f"log evaluation plots of {result.set_name} at step {step}"), \
                tempfile.TemporaryDirectory() as tmp:
            for name, figure in figures.items():
                figure.savefig(Path(tmp) / name, dpi=100)
                self._client.log_artifact(self.run_id, str(Path(tmp) / name), f"eval/{result.set_name}")

    def _load_history(self, key: str) -> list[tuple[int, float]]:
        if not self.active:
            return []
        with self._guarded(f"read the history of {key}"):
            return [(m.step, m.value) for m in self._client.get_metric_history(self.run_id, key)]
        return []

    def last_logged(self, key: str) -> tuple[int, float] | None:
        """(step, wall-clock seconds) of ``key``'s latest value in the run; None when it has none."""
        with self._guarded(f"read the history of {key}"):
            history = self._client.get_metric_history(self.run_id, key) if self.active else []
            latest = max(history, key=lambda m: (m.step, m.timestamp), default=None)
            return None if latest is None else (latest.step, latest.timestamp / 1000)
        return None

    def log_file(self, path: str, artifact_dir: str | None = None) -> None:
        """Upload one local file as an artifact of the run."""
        if self.active:
            with self._guarded(f"upload {path}"):
                self._client.log_artifact(self.run_id, path, artifact_dir)

    def attach(self, run_id: str) -> bool:
        """Log into an existing run without changing its status (an evaluation of a finished training run);
        False when the store does not have it."""
        if self.disabled:
            return False
        with self._guarded(f"open run {run_id}"):
            if self.uri.startswith(("http://", "https://")):
                _probe_http(self.uri, _HEALTH_PROBE_TIMEOUT_S)
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            try:
                self._client.get_run(run_id)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                return False
            self.run_id = run_id
            return True
        return False

    def finish(self, exported_model_path: str | None, status: str = "FINISHED") -> None:
        """Log the exported state dict under `model/`, register it, and close the run."""
        if status not in _RUN_STATUSES:
            raise ValueError(f"status must be one of {_RUN_STATUSES}, got {status!r}")
        if not self.active:
            self._stop_system_metrics(flush=False)
            return
        self._stop_system_metrics()
        with self._guarded("log and register the exported model"):
            if exported_model_path is not None:
                self._client.log_artifact(self.run_id, exported_model_path, "model")
                if self.register_model_name:
                    self._register_model(Path(exported_model_path).name)
        with self._guarded(f"end the run with status {status}"):
            self._client.set_terminated(self.run_id, status=status)
        self.run_id = None

    def _register_model(self, file_name: str) -> None:
        """Register `runs:/<run>/model` as a new version of `register_model_name`.

        `mlflow.register_model` in MLflow 3 expects an MLflow-format logged model and rejects a plain
        state-dict file, so the registered model and its version are created directly.
        """
        try:
            self._client.create_registered_model(self.register_model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self._client.create_model_version(
            self.register_model_name,
            source=f"runs:/{self.run_id}/model",
            run_id=self.run_id,
            tags={"state_dict_file": file_name, "layout": "openai"},
        )
        logger.info(
            "Registered %s version %s from run %s.",
            self.register_model_name, version.version, self.run_id,
        )


def _run_tags(
    config_dict: Mapping[str, Any], world_size: int | None, extra: Mapping[str, str] | None
) -> dict[str, str]:
    """Tags worth filtering runs by: the model architecture and the number of training workers."""
    tags: dict[str, str] = {}
    model = config_dict.get("model")
    if isinstance(model, Mapping) and model.get("name") is not None:
        tags["model"] = str(model["name"])
    if world_size is not None:
        tags["world_size"] = str(world_size)
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return tags


