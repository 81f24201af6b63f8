"""Streaming WebDataset shards (local or S3) through Ray Data into Ray Train workers, robust to bad data.

Why not ``ray.data.read_webdataset``: its default decoder fails the whole read on one bad JPEG, and with
``max_errored_blocks`` it drops the whole shard. Here the stream is built from three small stages:

1. a plan (here, on the process that builds the stream): one row per (epoch, shard) for every epoch
   still to run, shard order permuted per epoch from ``seed`` (shards already consumed are left out);
2. a read stage (Ray tasks, ``orchestrator.data.stages``): fetch a shard whole with retries and backoff,
   split the tar into samples, drop and count bad samples, skip and count a shard that stays unreadable;
3. a decode stage (a pool of ``decode_concurrency`` Ray actors, same module): decode, augment with the
   model library's transforms and tokenize, in batches; a corrupt image drops that sample only.

Counts go to one :class:`~orchestrator.data.monitor.DataStreamMonitor` actor; training workers report what
they consumed to it (:func:`iter_train_batches`, in the worker), so it knows which shards are fully
consumed (the resumable position) and whether the error budget is exceeded.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.config import DataConfig
from orchestrator.data.manifest import open_shard_set
from orchestrator.data.monitor import (
    MONITOR_NAMESPACE,
    DataErrorBudgetExceeded,
    DataStreamMonitor,
    control_actor_options,
    get_monitor,
)
from orchestrator.data.position import StreamProgress
from orchestrator.data.stages import DecodeAugmentTokenize, read_shard_rows


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard permutation of one epoch: a pure function of (seed, epoch), so a resumed run replays it."""
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_shards)]


def plan_epochs(shard_names: list[str], seed: int, epochs: int, position: StreamProgress | None = None) -> list[dict]:
    """(epoch, shard_index) rows still to stream from ``position`` (the start of the stream by default)."""
    position = position or StreamProgress()
    index = {name: i for i, name in enumerate(shard_names)}
    unknown = sorted(n for names in position.completed.values() for n in names if n not in index)
    if unknown:
        raise ValueError(f"data position names shards not in the manifest: {unknown[:5]}")
    rows = []
    for epoch in range(position.epoch, epochs):
        done = {index[n] for n in position.completed.get(epoch, ())}
        order = shard_order(len(shard_names), seed, epoch)
        rows += [{"epoch": epoch, "shard_index": shard} for shard in order if shard not in done]
    return rows


@dataclass
class TrainStream:
    """What :func:`build_train_dataset` returns: the dataset plus what the training loop needs to know."""

    dataset: Any  # ray.data.Dataset of {"image", "text", "epoch", "shard_index", "sample_id"}
    monitor_name: str  # pass to workers: iter_train_batches / stream_counters / stream_position
    monitor: Any  # the actor handle; holding it keeps the monitor alive as long as the stream
    samples_per_epoch: int
    num_shards: int
    epochs: int


def build_train_dataset(cfg: DataConfig, *, epochs: int, position: StreamProgress | None = None,
                        train: bool = True) -> TrainStream:
    """The training stream over ``epochs`` epochs (resuming at ``position``), checked before any work.

    Pass ``stream.dataset`` to ``TorchTrainer(datasets={"train": ...}, dataset_config=exact_once_data_config())``
    and ``stream.monitor_name`` to the workers, which iterate with :func:`iter_train_batches`.
    """
    import ray

    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    folder, manifest = open_shard_set(cfg.shards, cfg.s3_endpoint_url)
    names = [shard.name for shard in manifest.shards]
    plan = plan_epochs(names, cfg.seed, epochs, position)
    monitor_name = f"rayclip-data-monitor-{uuid.uuid4().hex[:12]}"
    monitor = ray.remote(DataStreamMonitor).options(**control_actor_options(monitor_name, MONITOR_NAMESPACE)).remote(
        names, manifest.total_samples, cfg.max_error_fraction, position)
    read_kwargs = dict(folder_url=folder.url, endpoint_url=cfg.s3_endpoint_url, shard_names=names,
                       shard_samples=[shard.samples for shard in manifest.shards], retries=cfg.read_retries,
                       backoff_s=cfg.retry_backoff_s, monitor_name=monitor_name)
    read_compute = ray.data.TaskPoolStrategy(size=cfg.read_concurrency) if cfg.read_concurrency else None
    dataset = (
        ray.data.from_items(plan, override_num_blocks=max(1, len(plan)))
        .map_batches(read_shard_rows, batch_size=1, fn_kwargs=read_kwargs, compute=read_compute)
        .map_batches(DecodeAugmentTokenize, batch_size=cfg.decode_batch_size,
                     fn_constructor_kwargs=dict(image_size=cfg.image_size, image_dtype=cfg.image_dtype,
                                                context_length=cfg.context_length, monitor_name=monitor_name,
                                                train=train, seed=cfg.seed),
                     compute=ray.data.ActorPoolStrategy(size=cfg.decode_concurrency))
    )
    return TrainStream(dataset, monitor_name, monitor, manifest.total_samples, len(names), epochs)


def iter_train_batches(dataset_shard, cfg: DataConfig, monitor_name: str, *, rank: int = 0,
                       device: str = "cpu") -> Iterator[dict]:
    """Torch batches for one worker, reporting what it consumed; raises once the error budget is exceeded.

    ``dataset_shard`` is ``ray.train.get_dataset_shard("train")`` (or the Dataset itself on the driver).
    Batches hold ``image`` (B, R, R, 3) channels-last (``models.transforms.channels_last_batch_to_model``
    makes the model's normalised (B, 3, R, R) on the training device), ``text`` (B, ctx) int64 and ``epoch`` / ``shard_index`` /
    ``sample_id``; near an epoch boundary one batch can hold samples of two epochs.
    """
    import ray

    monitor = get_monitor(monitor_name)
    batches = dataset_shard.iter_torch_batches(
        batch_size=cfg.batch_size, local_shuffle_buffer_size=cfg.shuffle_buffer or None,
        local_shuffle_seed=cfg.seed + rank if cfg.shuffle_buffer else None, device=device)
    for batch in batches:
        counts = Counter(zip(batch["epoch"].tolist(), batch["shard_index"].tolist()))
        failure = ray.get(monitor.record_consumed.remote(dict(counts)))
        if failure:
            raise DataErrorBudgetExceeded(failure)
        yield batch
    failure = ray.get(monitor.get_failure.remote())
    if failure:
        raise DataErrorBudgetExceeded(failure)


def exact_once_data_config():
    """A Ray Train ``DataConfig`` that splits the stream without dropping rows (Train's default split is
    ``equal=True``, which drops up to world_size - 1 rows at the end to even out the workers).

    With it, workers may get a few batches more or fewer than each other: a loop that runs collectives
    must stop every rank when the first one runs out.
    """
    from ray.train import DataConfig as TrainDataConfig

    class ExactOnceDataConfig(TrainDataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, dataset in datasets.items():
                dataset = dataset.copy(dataset)
                dataset.context.execution_options = self._resolve_execution_options(name)
                for rank, split in enumerate(dataset.streaming_split(world_size, equal=False)):
                    output[rank][name] = split
            return output

    return ExactOnceDataConfig()
