"""Fixed-size training batches on one Ray Train worker, resumable without repeating a sample.

Shards are the stream's resume unit, so shards that were partly consumed at the checkpoint are streamed
again; the checkpoint's :class:`~orchestrator.data.DataPosition` holds the samples already trained on from
them, and they are filtered out here. Batches are re-cut to this worker's exact share of the global
batch (ranks may differ by one sample when the global batch does not divide by the worker count); when one rank's split runs dry, all ranks stop together.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator

import torch

from models import channels_last_batch_to_model
from orchestrator.collectives import all_gather_objects, all_reduce_sum
from orchestrator.config import RunConfig
from orchestrator.data import (
    SHARD_ID_BITS,
    DataPosition,
    iter_train_batches,
    stream_counters,
    stream_position,
    stream_visit_names,
)
from orchestrator.train.controller_datasets import current_monitor


class WorkerStream:
    """This worker's split of the training stream, started as soon as the worker starts.

    The stream's start (Ray Data's split coordinator and decode actors started, the first shards read and
    decoded, the shuffle buffer filled) takes seconds that need not wait for the model: a background thread
    pulls the first batch while the worker builds its engine (or loads a checkpoint), and iterating the stream
    hands that batch over first. A failure of the stream's start is raised where the stream is iterated.
    """

    def __init__(self, cfg: RunConfig):
        import ray.train

        self.rank = ray.train.get_context().get_world_rank()
        self.monitor_name = current_monitor(cfg)
        self.shard_names = stream_visit_names(self.monitor_name)  # visit index -> position key
        self._batches = iter_train_batches(ray.train.get_dataset_shard("train"), cfg.data, self.monitor_name,
                                           rank=self.rank)
        self._first: dict | None = None
        self._error: BaseException | None = None
        self._started = threading.Thread(target=self._pull_first, name="rayclip-stream-start", daemon=True)
        self._started.start()

    def _pull_first(self) -> None:
        try:
            self._first = next(self._batches, None)
        except BaseException as error:  # noqa: BLE001 (raised again where the stream is iterated)
            self._error = error

    def __iter__(self) -> Iterator[dict]:
        self._started.join()
        if self._error is not None:
            raise self._error
        if self._first is not None:
            first, self._first = self._first, None
            yield first
            yield from self._batches


class TrainBatches:
    """Fixed-size ``(images, tokens)`` batches for this worker from its ``stream``, resuming at ``position``.

    :meth:`position` is collective (all ranks call it at checkpoints): it merges every rank's consumed
    samples of the partly consumed shards with the stream's shard-level progress.
    """

    def __init__(self, cfg: RunConfig, device: torch.device, dtype: torch.dtype, position: DataPosition,
                 stream: WorkerStream):
        import ray.train

        self.cfg, self.device, self.dtype, self.stream = cfg, device, dtype, stream
        self.rank = stream.rank
        self.batch_size = cfg.worker_batch_size(ray.train.get_context().get_world_size(), self.rank)  # any count
        self.monitor_name = stream.monitor_name
        self.shard_names = stream.shard_names
        self.saved = position  # the last position this run saved (or resumed from)
        self.skip = position.consumed_ordinals()  # (epoch, shard name) -> ordinals trained on before the resume
        self.consumed: dict[tuple[int, str], list[int]] = defaultdict(list)
        self.auditing = cfg.checkpoint.audit_sample_ids
        self.new_audit: list[str] = []
        self.filtered_repeats = 0

    def _rows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[int, str], int]]:
        for batch in self.stream:
            shards = [self.shard_names[index] for index in batch["shard_index"].tolist()]
            keys = list(zip(batch["epoch"].tolist(), shards))
            ordinals = (batch["sample_id"] & ((1 << SHARD_ID_BITS) - 1)).tolist()
            for row, (key, ordinal) in enumerate(zip(keys, ordinals)):
                if ordinal in self.skip.get(key, ()):
                    self.filtered_repeats += 1
                    continue
                yield batch["image"][row], batch["text"][row], key, ordinal

    def _local_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, texts = [], []
        for image, text, key, ordinal in self._rows():
            images.append(image)
            texts.append(text)
            self.consumed[key].append(ordinal)
            if self.auditing:
                self.new_audit.append(f"{key[0]}:{key[1]}:{ordinal}")
            if len(images) == self.batch_size:
                yield torch.stack(images), torch.stack(texts)
                images, texts = [], []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        local = self._local_batches()
        while True:
            batch = next(local, None)
            missing = all_reduce_sum(torch.tensor([0.0 if batch is not None else 1.0]))
            if float(missing) > 0:  # some rank's split is exhausted: every rank stops at the same step
                return
            images, tokens = batch
            yield channels_last_batch_to_model(images.to(self.device), self.dtype), tokens.to(self.device)

    def position(self) -> DataPosition:
        """The resumable position now: the stream's complete shards + every rank's consumed samples."""
        stream = stream_position(self.monitor_name)
        mine = DataPosition.of_samples(stream, self.consumed, self.new_audit if self.auditing else None)
        merged = self.saved
        for part in all_gather_objects(mine):
            merged = merged.merge(part)
        self.saved, self.new_audit = merged, []
        self.consumed = defaultdict(list, {k: v for k, v in self.consumed.items() if not stream.is_complete(*k)})
        return merged

    def error_counters(self) -> dict[str, float]:
        counters = {f"data/{name}": float(value) for name, value in stream_counters(self.monitor_name).items()}
        counters["data/filtered_repeats"] = float(self.filtered_repeats)
        return counters
