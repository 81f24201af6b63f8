"""The driver side: a Ray Train ``TorchTrainer`` built from a validated run config, and the run's name.

Fault tolerance: ``FailureConfig(max_failures)`` restarts the worker group after a worker or node
failure and every worker resumes from the run's newest intact checkpoint in storage
(``checkpoint.resume_point``); so does a new trainer with the same run name (``jobs/pretrain.py --resume
NAME``). Errors a restart cannot heal (``orchestrator.failures``) are not retried: :class:`StopOnUnhealable`,
a Ray Train callback in the controller, ends the run at once.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from orchestrator import noise, runs
from orchestrator.config import ConfigError, RunConfig, in_ray_job_copy
from orchestrator.data import resolve_source
from orchestrator.eval import open_set
from orchestrator.failures import RunStopped, cannot_heal, error_kind
from orchestrator.logs import get_logger
from orchestrator.plan import memory_problems
from orchestrator.ray_start import start_ray
from orchestrator.storage import StorageError
from orchestrator.runs import EXPORT_FILE
from orchestrator.train.controller_datasets import build_datasets
from orchestrator.train.initial_weights import check_initial_weights
from orchestrator.train.worker_entry import train_worker

logger = get_logger("train")
# DeepSpeed JIT-builds its CPU communication op once (60-90 s) into this cache, shared by every checkout.
DEFAULT_EXTENSIONS_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rayclip" / "torch_extensions"


def init_ray(cfg: RunConfig, runs_at_once: int = 1) -> None:
    """Join the cluster of ``ray job submit``, or start a local one with enough logical CPUs for the training
    workers plus the data stream's read tasks and decode actors of ``runs_at_once`` runs (a search's concurrent
    trials), which would otherwise wait forever on a 2-core laptop."""
    per_run = cfg.scaling.max_workers * cfg.scaling.cpus_per_worker + cfg.data.decode_concurrency + 1
    start_ray(math.ceil(per_run * runs_at_once),
              what=f"{runs_at_once} x ({cfg.scaling.max_workers} training workers, decode actors and a read task)",
              shortfall_hint="restart it with more --num-cpus, or lower scaling.num_workers or data.decode_concurrency")


def name_run(cfg: RunConfig, resume: str | None = None) -> RunConfig:
    """A fresh run gets a name no other run has (``<name>-<UTC time>-<random>``, see ``runs.unique_run_name``);
    ``resume`` must name a run in storage."""
    if resume is None:
        return cfg.model_copy(update={"name": runs.unique_run_name(cfg.name)})
    run = runs.run_location(cfg.checkpoint.storage_path, cfg.checkpoint.s3_endpoint_url, resume)
    if not runs.run_exists(run):
        raise ConfigError(
            f"--resume {resume!r}: no run at {run.url} "
            "(check checkpoint.storage_path and the run name printed by the first job)"
        )
    return cfg.model_copy(update={"name": resume})


def stop_on_unhealable():
    """A Ray Train callback (it runs in the controller) that ends the run at once when a worker failed with an
    error a restart cannot heal; ``fit()`` then raises ``ControllerError`` holding :class:`RunStopped`."""
    from ray.train import ControllerError, UserCallback

    class StopOnUnhealable(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            for rank, error in sorted(worker_exceptions.items()):
                reason = cannot_heal(error)
                if reason is not None:
                    raise ControllerError(RunStopped(reason, rank, error_kind(error)))

    return StopOnUnhealable()


def worker_environment(cfg: RunConfig) -> dict[str, str]:
    """Environment of every training worker: DeepSpeed's accelerator and its JIT-extension cache."""
    env = {
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(DEFAULT_EXTENSIONS_DIR)),
        **noise.env_for(noise.TRAIN_WORKER),
    }
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # never probe for CUDA on CPU workers
    return env


def build_trainer(cfg: RunConfig, datasets: dict | None = None, callbacks: list | None = None):
    """A ``TorchTrainer`` running ``train_loop_per_worker`` on the configured workers.

    ``datasets`` defaults to the configured shard stream, rebuilt by Ray Train's controller at every
    worker-group start (``orchestrator.train.controller_datasets``); the config travels to workers as a
    plain dict. ``callbacks`` are Ray Train callbacks (a Tune trial passes ``TuneReportCallback``).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    root = runs.storage_root(cfg.checkpoint.storage_path, cfg.checkpoint.s3_endpoint_url)
    run_config = ray.train.RunConfig(
        name=cfg.name,
        storage_path=root.path,
        storage_filesystem=root.fs if root.is_s3 else None,
        failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        worker_runtime_env={"env_vars": worker_environment(cfg)},
        logging_config=ray.train.LoggingConfig(log_level=noise.level_for("ray.train")),
        callbacks=[stop_on_unhealable(), *(callbacks or [])],
    )
    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.extra_resources}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    scaling = ray.train.ScalingConfig(
        # (min, max) makes Ray Train v2 elastic: it starts once min workers fit, and on a worker-group
        # failure or every resize_check_s while healthy, restarts the group at the size that fits now
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker=resources,
        accelerator_type=cfg.scaling.accelerator_type,
        elastic_resize_monitor_interval_s=cfg.scaling.resize_check_s,
    )
    return TorchTrainer(
        train_worker,
        train_loop_config={"run": cfg.model_dump(mode="json")},
        scaling_config=scaling,
        run_config=run_config,
        # Ray Train's default split (equal=True): every worker gets the same number of rows, which the
        # per-step collectives need; it drops at most num_workers - 1 rows of the whole stream.
        datasets=datasets if datasets is not None else build_datasets(cfg),
    )


def check_inputs(cfg: RunConfig) -> None:
    """Fail before any Ray time if the shards or an evaluation set (its layout, class names, splits) cannot be used.

    Raises :class:`ConfigError` naming the field; under ``ray job submit --working-dir`` a local path
    that resolved into Ray's temporary copy of the directory (where ``data/`` is not shipped) says so. First,
    without any I/O: a GPU run whose batch plan cannot fit its GPU (``scaling.gpu_type``) is refused naming
    the term that does not fit (``orchestrator.plan``, the arithmetic of ``jobs/plan.py``). ``model.init_from``
    must name weights of ``model.name``'s architecture (read here once, see ``check_initial_weights``).
    """
    too_big = memory_problems(cfg, None)
    if too_big:
        raise ConfigError(f"the batch plan does not fit scaling.gpu_type: {'; '.join(too_big)} "
                          f"(see python jobs/plan.py --config <this config>)")
    if cfg.model.init_from is not None:
        try:
            check_initial_weights(cfg)
        except (StorageError, OSError, ValueError) as error:
            raise ConfigError(str(error)) from None
    checks = [(f"data.sources[{i}].shards" if cfg.data.sources else "data.shards", source.shards,
               lambda source=source: resolve_source(source, cfg.data.s3_endpoint_url))
              for i, source in enumerate(cfg.data.source_list())]
    position = {set_cfg.name: index for index, set_cfg in enumerate(cfg.eval.sets)}
    for set_cfg in cfg.eval_sets():
        field = f"eval.sets[{position[set_cfg.name]}].data" if set_cfg.name in position else "data.heldout"
        checks.append((field, set_cfg.data, lambda set_cfg=set_cfg: open_set(set_cfg, cfg.data.s3_endpoint_url, limit=False)))
    for field, url, check in checks:
        try:
            check()
        except (StorageError, OSError, ValueError) as error:
            hint = ""
            if in_ray_job_copy() and not str(url).startswith("s3://"):
                hint = (f" (a job of `ray job submit --working-dir` runs in a temporary copy that holds no data: "
                        f"pass the shards' absolute path or an s3:// URL, e.g. --set {field}=/abs/path)")
            raise ConfigError(f"{field}={url!r}: {error}{hint}") from None
