"""A run's MLflow life: is the store there, the run created (by the job's driver, before Ray starts), its model
registered, its end.

The driver creates the run so that every attempt of a training run (restarts after a lost node, ``--resume``)
logs into one MLflow run, and closes it when the workers cannot (Ctrl-C, an error that stops the run). The
workers log everything else (``run_tracker``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from orchestrator import noise
from orchestrator.logs import get_logger
from orchestrator.tracking.experiments import default_artifact_location, ensure_experiment
from orchestrator.tracking.outbox import is_transient

logger = get_logger("tracking")
PROBE_TIMEOUT_S = 10.0
LOCAL_STORE_ATTEMPTS = 5
# MLflow's defaults (7 retries, 120 s timeout) make a dead server cost minutes per call. These
# defaults still retry a blip but give up in seconds; an operator's own env settings win.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class TrackingUnreachable(RuntimeError):
    """The tracking store does not answer (or refuses to work); the message says where and why."""


def check_store(uri: str) -> None:
    """Raise :class:`TrackingUnreachable` unless the store at ``uri`` answers: a server's ``/health`` (any HTTP
    answer counts), a local store opened and read."""
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            return  # it answered
        except OSError as error:
            raise TrackingUnreachable(f"no MLflow server answers at {uri} ({getattr(error, 'reason', error)})") from None
        return
    for attempt in range(LOCAL_STORE_ATTEMPTS):
        try:
            with _only_one_opener(uri):
                _client(uri).search_experiments(max_results=1)
            return
        except Exception as error:  # noqa: BLE001 (a corrupt or unwritable store raises many kinds)
            if attempt + 1 == LOCAL_STORE_ATTEMPTS:
                raise TrackingUnreachable(f"the MLflow store {uri} cannot be used "
                                          f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
            time.sleep(1.0)


@contextlib.contextmanager
def _only_one_opener(uri: str):
    """Hold a lock on a sqlite store's folder while opening it: jobs that create a new store at the same
    moment would race in its migrations, and a migration cut short leaves the store unusable for good."""
    path = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    folder = os.path.dirname(os.path.abspath(path)) if path else None
    if not folder or not os.path.isdir(folder):
        yield
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing the descriptor releases the lock


def create_run(settings, run_name: str, config_dict: dict) -> str:
    """A new run in ``settings.experiment`` (created when missing), tagged as the workers will tag it; its id."""
    client = _client(settings.uri)
    location = settings.artifact_location or default_artifact_location(settings.uri)
    experiment_id = ensure_experiment(client, settings.experiment, location)
    tags = run_tags(config_dict, None, settings.tags)
    return client.create_run(experiment_id, run_name=settings.run_name or run_name, tags=tags).info.run_id


def end_run(uri: str, run_id: str, status: str) -> bool:
    """Close a run the workers could not close; False when the store does not answer."""
    try:
        client = _client(uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)
        return True
    except Exception as error:  # noqa: BLE001
        if is_transient(error):
            return False
        raise


def _client(uri: str) -> MlflowClient:
    if uri.startswith(("http://", "https://")):
        for name, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
    noise.install(noise.TRACKING)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def register_model(client: MlflowClient, name: str, run_id: str, file_name: str) -> str:
    """Register `runs:/<run>/model` as a new version of `name`; returns the version.

    `mlflow.register_model` in MLflow 3 expects an MLflow-format logged model and rejects a plain
    state-dict file, so the registered model and its version are created directly.
    """
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id,
                                          tags={"state_dict_file": file_name, "layout": "openai"})
    logger.info("Registered %s version %s from run %s.", name, version.version, run_id)
    return version.version


def run_tags(
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


