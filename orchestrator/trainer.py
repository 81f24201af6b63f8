"""The driver side: a Ray Train ``TorchTrainer`` built from a validated run config, and the run's name.

Fault tolerance: ``FailureConfig(max_failures)`` restarts the worker group after a worker or node
failure and every worker resumes from ``ray.train.get_checkpoint()``. Resume on request: a new trainer
with the same run name and storage path finds Ray Train's checkpoint-manager snapshot there and hands
its latest checkpoint to the workers in the same way (``jobs/pretrain.py --resume NAME``).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from orchestrator.checkpoint_storage import s3_checkpoint_filesystem
from orchestrator.config import ConfigError, RunConfig
from orchestrator.storage import default_region

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # written by Ray Train v2 beside the checkpoints


@dataclass(frozen=True)
class StorageTarget:
    """Where Ray Train writes: a filesystem and the path inside it (bucket/prefix for S3)."""

    filesystem: pafs.FileSystem | None
    path: str
    url: str


def init_ray(cfg: RunConfig) -> None:
    """Join the cluster of ``ray job submit`` (RAY_ADDRESS is set), or start a local one for this checkout.

    A local cluster gets this checkout on its workers' PYTHONPATH (under ``ray job submit --working-dir``
    Ray ships the code itself) and enough logical CPUs for the training workers plus the data stream's
    read tasks and decode actors, which would otherwise wait forever on a 2-core laptop.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING")
        return
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    needed = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + cfg.data.decode_concurrency + 1
    ray.init(
        num_cpus=max(os.cpu_count() or 1, math.ceil(needed)),
        logging_level="WARNING",
        runtime_env={"env_vars": {"PYTHONPATH": python_path}},
    )


def storage_target(cfg: RunConfig) -> StorageTarget:
    """The configured storage path as Ray Train wants it (an explicit S3 filesystem for custom endpoints)."""
    url = cfg.checkpoint.storage_path
    if not url.startswith("s3://"):
        return StorageTarget(None, url, url)
    path = url.removeprefix("s3://").strip("/")
    # The driver's region travels with the filesystem, so every worker node writes to the same one.
    filesystem = s3_checkpoint_filesystem(cfg.checkpoint.s3_endpoint_url, default_region())
    return StorageTarget(filesystem, path, url)


def _run_exists(target: StorageTarget, name: str) -> bool:
    filesystem = target.filesystem or pafs.LocalFileSystem()
    snapshot = f"{target.path.rstrip('/')}/{name}/{RUN_SNAPSHOT}"
    return filesystem.get_file_info(snapshot).type != pafs.FileType.NotFound


def name_run(cfg: RunConfig, resume: str | None = None) -> RunConfig:
    """A fresh run gets ``<name>-<UTC timestamp>``; ``resume`` must name a run with a checkpoint in storage."""
    target = storage_target(cfg)
    if resume is None:
        name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    elif not _run_exists(target, resume):
        raise ConfigError(
            f"--resume {resume!r}: no run with a checkpoint at {target.url.rstrip('/')}/{resume} "
            "(check checkpoint.storage_path and the run name printed by the first job)"
        )
    else:
        name = resume
    return cfg.model_copy(update={"name": name})


def worker_environment(cfg: RunConfig) -> dict[str, str]:
    """Environment of every training worker: DeepSpeed's accelerator and its JIT-extension cache."""
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))}
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # never probe for CUDA on CPU workers
    return env


def build_trainer(cfg: RunConfig, datasets: dict | None = None):
    """A ``TorchTrainer`` running ``train_loop_per_worker`` on the configured workers.

    ``datasets`` defaults to the configured shard stream (``orchestrator.data``); the config travels
    to workers as a plain dict.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestrator.train_loop import train_loop_per_worker

    target = storage_target(cfg)
    run_config = ray.train.RunConfig(
        name=cfg.name,
        storage_path=target.path,
        storage_filesystem=target.filesystem,
        failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        worker_runtime_env={"env_vars": worker_environment(cfg)},
    )
    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.extra_resources}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    scaling = ray.train.ScalingConfig(
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker=resources,
        accelerator_type=cfg.scaling.accelerator_type,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg.model_dump(mode="json")},
        scaling_config=scaling,
        run_config=run_config,
        # Ray Train's default split (equal=True): every worker gets the same number of rows, which the
        # per-step collectives need; it drops at most num_workers - 1 rows of the whole stream.
        datasets=datasets if datasets is not None else training_datasets(cfg),
    )


def training_datasets(cfg: RunConfig) -> dict:
    """The ``train`` Ray Dataset of the configured shards (built lazily by Ray Data)."""
    from orchestrator.training_data import build_datasets

    return build_datasets(cfg)


def check_inputs(cfg: RunConfig) -> None:
    """Fail before any Ray time if the shards (or the held-out split for evaluation) cannot be opened."""
    from orchestrator.data import open_shard_set

    open_shard_set(cfg.data.shards, cfg.data.s3_endpoint_url)
    if cfg.eval.enabled:
        open_shard_set(cfg.data.heldout_url, cfg.data.s3_endpoint_url)


def mlflow_ui_command(cfg: RunConfig) -> str:
    """How to look at the run: a server URI is opened in a browser, a local store needs ``mlflow ui``."""
    uri = cfg.tracking.uri
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000"


def describe_result(cfg: RunConfig, result) -> str:
    """What a finished job prints: where the model, checkpoints and MLflow run are, and the accuracy."""
    from orchestrator.checkpoint import EXPORT_FILE

    metrics = result.metrics or {}
    checkpoint = result.checkpoint.path if result.checkpoint else None
    lines = [
        f"run: {cfg.name} ({metrics.get('step', '?')}/{cfg.schedule.total_steps} steps)",
        f"checkpoints: {result.path}",
        f"exported model (OpenAI state-dict layout): {checkpoint}/{EXPORT_FILE}" if checkpoint else "no checkpoint",
        f"MLflow: experiment {cfg.tracking.experiment!r}, run {metrics.get('mlflow_run_id')} at {cfg.tracking.uri}",
        f"MLflow UI: {mlflow_ui_command(cfg)}",
    ]
    loss = metrics.get("train/loss", (metrics.get("train") or {}).get("loss"))  # Ray may nest "a/b" keys
    if loss is not None:
        lines.append(f"final train loss: {loss:.4f}")
    if "zero_shot_top1" in metrics:
        lines.append(f"zero-shot top-5: {metrics['zero_shot_top5']:.3f}")
        lines.append(f"zero-shot top-1: {metrics['zero_shot_top1']:.3f}")
    return "\n".join(lines)
