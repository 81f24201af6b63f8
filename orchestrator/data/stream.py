"""Streaming WebDataset shards (local or S3) through Ray Data into Ray Train workers, robust to bad data.

Why not ``ray.data.read_webdataset``: its default decoder fails the whole read on one bad JPEG, and with
``max_errored_blocks`` it drops the whole shard. Here the stream is built from three small stages:

1. a plan (here, on the process that builds the stream): one row per shard visit for every epoch still
   to run, over every source by weight, in a seeded order per epoch (``orchestrator.data.visits``;
   visits already consumed are left out);
2. a read stage (Ray tasks, ``orchestrator.data.stages``): stream a shard in blocks of samples with
   retries and backoff, drop and count bad samples, skip and count a shard that stays unreadable, and
   wait while the stream is ``read_ahead`` ahead of training;
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

from orchestrator.config import DataConfig
from orchestrator.data.monitor import (
    MONITOR_NAMESPACE,
    DataErrorBudgetExceeded,
    DataStreamMonitor,
    ReadAhead,
    control_actor_options,
    get_monitor,
)
from orchestrator.data.position import StreamProgress
from orchestrator.data.shardsets import SourceShards, resolve_sources
from orchestrator.data.stages import DecodeAugmentTokenize, read_shard_rows
from orchestrator.data.visits import VisitTable, plan_epochs


# A read task mostly waits on storage. Its own CPU share also keeps Ray Data from fusing it into the decode
# actors: a fused task hands its output on only at its end, so one paused at the read-ahead bound would
# hold back samples training waits for (and hold the actor), where a separate read task holds nothing.
READ_TASK_CPUS = 0.5


@dataclass
class TrainStream:
    """What :func:`build_train_dataset` returns: the dataset plus what the training loop needs to know."""

    dataset: Any  # ray.data.Dataset of {"image", "text", "epoch", "shard_index", "sample_id"}
    monitor_name: str  # pass to workers: iter_train_batches / stream_counters / stream_position
    monitor: Any  # the actor handle; holding it keeps the monitor alive as long as the stream
    samples_per_epoch: int
    num_shards: int  # visit slots (a shard of weight 2 has two)
    epochs: int
    table: VisitTable


def read_ahead_bound(cfg: DataConfig, consumers: int) -> ReadAhead:
    """The read-ahead window for ``consumers`` training workers (see ``data.read_ahead_batches``).

    Its floor is what the pipeline holds anyway (each worker's shuffle buffer and a few batches, the
    decode actors' batches, a block per read): a smaller window could starve a worker.
    """
    if cfg.read_ahead_batches == "unbounded":
        return ReadAhead()
    floor = (consumers * (cfg.shuffle_buffer + 3 * cfg.batch_size)
             + (cfg.decode_concurrency + 1) * cfg.decode_batch_size + 2 * cfg.read_block_samples)
    fixed = None if cfg.read_ahead_batches == "auto" else consumers * cfg.read_ahead_batches * cfg.batch_size
    return ReadAhead(floor=floor, seconds=cfg.read_ahead_s, fixed=fixed)


def build_train_dataset(cfg: DataConfig, *, epochs: int, position: StreamProgress | None = None,
                        train: bool = True, sources: list[SourceShards] | None = None,
                        consumers: int = 1) -> TrainStream:
    """The training stream over ``epochs`` epochs (resuming at ``position``), checked before any work.

    ``sources`` are the resolved shard sets (resolved from ``cfg`` when not given); ``consumers`` is the
    number of training workers, which sizes the read-ahead bound. Pass ``stream.dataset`` to
    ``TorchTrainer(datasets={"train": ...}, dataset_config=exact_once_data_config())`` and
    ``stream.monitor_name`` to the workers, which iterate with :func:`iter_train_batches`.
    """
    import ray

    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    table = VisitTable.of_sources(sources if sources is not None else resolve_sources(cfg))
    plan = plan_epochs(table, cfg.seed, epochs, position)
    monitor_name = f"rayclip-data-monitor-{uuid.uuid4().hex[:12]}"
    monitor = ray.remote(DataStreamMonitor).options(**control_actor_options(monitor_name, MONITOR_NAMESPACE)).remote(
        table, cfg.seed, cfg.max_error_fraction, position, read_ahead_bound(cfg, consumers))
    read_kwargs = dict(endpoint_url=cfg.s3_endpoint_url, caption_key=cfg.caption_key,
                       block_samples=cfg.read_block_samples, retries=cfg.read_retries,
                       backoff_s=cfg.retry_backoff_s, monitor_name=monitor_name)
    read_compute = ray.data.TaskPoolStrategy(size=cfg.read_concurrency) if cfg.read_concurrency else None
    dataset = (
        ray.data.from_items(plan, override_num_blocks=max(1, len(plan)))
        .map_batches(read_shard_rows, batch_size=1, fn_kwargs=read_kwargs, compute=read_compute,
                     num_cpus=READ_TASK_CPUS)
        .map_batches(DecodeAugmentTokenize, batch_size=cfg.decode_batch_size,
                     fn_constructor_kwargs=dict(image_size=cfg.image_size, image_dtype=cfg.image_dtype,
                                                context_length=cfg.context_length, monitor_name=monitor_name,
                                                train=train, seed=cfg.seed),
                     compute=ray.data.ActorPoolStrategy(size=cfg.decode_concurrency))
    )
    return TrainStream(dataset, monitor_name, monitor, table.samples_per_epoch, len(table.visits), epochs, table)


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
