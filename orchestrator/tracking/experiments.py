"""The MLflow experiment a run logs into: created with a durable artifact location and marked as model training.

With a sqlite store and no artifact root, MLflow puts an experiment's artifacts under the working
directory of the process that creates it, and a Ray Train worker works in Ray's per-session temporary
folder: the config, plots and exported model would vanish with the Ray session, and the experiment would
keep that location for every later run. So rayclip names the location when it creates an experiment:
beside a local store by default, the server's own store for an http(s) tracking URI (the server
decides), or ``tracking.artifact_location`` (an ``s3://`` URL or a folder).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from orchestrator.logs import get_logger

logger = get_logger("tracking")

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"  # the MLflow UI's "machine learning" view, not GenAI
ARTIFACTS_FOLDER = "mlartifacts"


def default_artifact_location(tracking_uri: str) -> str | None:
    """Beside a local sqlite store (``<store folder>/mlartifacts``); None lets a server or other store decide."""
    if tracking_uri.startswith("sqlite:///"):
        store = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        return (store.parent / ARTIFACTS_FOLDER).as_uri()
    return None


def is_temporary(artifact_location: str | None) -> bool:
    """True for a local location inside a Ray session's folder (``<ray temp dir>/session_<date>/...``),
    which Ray deletes or replaces with the next session."""
    if not artifact_location:
        return False
    parsed = urlparse(artifact_location)
    if parsed.scheme not in ("", "file"):
        return False
    parts = Path(parsed.path if parsed.scheme else artifact_location).parts
    return any(part.startswith("session_") and parent == "ray" for parent, part in zip(parts, parts[1:]))


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created with ``artifact_location`` and the model-training kind if missing.

    An existing experiment keeps its location (MLflow cannot move it); one inside a Ray session's folder
    is reported, with what to do.
    """
    existing = client.get_experiment_by_name(name)
    if existing is None:
        try:
            experiment_id = client.create_experiment(name, artifact_location=artifact_location,
                                                     tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
            logger.info("MLflow experiment %r created; artifacts go to %s", name,
                        client.get_experiment(experiment_id).artifact_location)
            return experiment_id
        except MlflowException as exc:  # another job created it between the two calls
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            existing = client.get_experiment_by_name(name)
    if is_temporary(existing.artifact_location):
        logger.warning("MLflow experiment %r keeps its artifacts in a Ray session's temporary folder (%s), "
                       "which Ray deletes; set tracking.experiment to a new name to keep this run's artifacts",
                       name, existing.artifact_location)
    if EXPERIMENT_KIND_TAG not in existing.tags:
        client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return existing.experiment_id
