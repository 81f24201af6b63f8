"""Where a pretraining run lives in storage: the only module that knows the layout and reads Ray Train's
snapshot file. A leaf: it imports nothing of rayclip's but ``storage``.

    <checkpoint.storage_path>/<run name>/
        checkpoint_manager_snapshot.json     Ray Train v2's record of the run's reported checkpoints
        checkpoint_step_00000100/            one folder per reported checkpoint (``checkpoint_dir_name``)
            ds/                              DeepSpeed's files (every rank's ZeRO partition)
            train_state.json                 step, data position, MLflow run id, ...
            openai_model.pt                  the final checkpoint's consolidated model, OpenAI's layout

Ray Train writes the snapshot beside the checkpoints after each report; a run with one is a run that can
be resumed (``jobs/pretrain.py --resume NAME``), and its ``latest_checkpoint_result`` names the folder a
restarted worker group resumes from.
"""

from __future__ import annotations

import json

from orchestrator import storage

RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # written by Ray Train v2 beside the checkpoints
DEEPSPEED_TAG = "ds"
STATE_FILE = "train_state.json"
EXPORT_FILE = "openai_model.pt"


def checkpoint_dir_name(step: int) -> str:
    """The folder name of the checkpoint reported after optimizer step ``step``."""
    return f"checkpoint_step_{step:08d}"


def storage_root(storage_path: str, endpoint_url: str | None = None) -> storage.Location:
    """``checkpoint.storage_path`` as the filesystem Ray Train writes through (boto3 writes on S3)."""
    if not storage_path.startswith("s3://"):
        return storage.resolve(storage_path)
    path = storage_path.removeprefix("s3://").strip("/")
    # The driver's region travels with the filesystem, so every worker node writes to the same one.
    return storage.Location(storage.s3_checkpoint_filesystem(endpoint_url), path, "s3://" + path, endpoint_url)


def run_location(storage_path: str, endpoint_url: str | None, name: str) -> storage.Location:
    """The folder of run ``name``."""
    return storage_root(storage_path, endpoint_url).child(name)


def run_exists(run: storage.Location) -> bool:
    """Whether Ray Train has recorded a checkpoint of this run (its snapshot file exists)."""
    return storage.exists(run.child(RUN_SNAPSHOT))


def latest_checkpoint(run: storage.Location) -> storage.Location | None:
    """The run's latest reported checkpoint folder, from Ray Train's snapshot (None before the first)."""
    try:
        snapshot = json.loads(storage.read_bytes(run.child(RUN_SNAPSHOT)))
    except FileNotFoundError:
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return run.child(latest["checkpoint_dir_name"]) if latest else None
