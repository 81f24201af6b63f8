"""Fixed-size training batches on one Ray Train worker, resumable without repeating a sample.

Shards are the stream's resume unit, so shards that were partly consumed at the checkpoint are streamed
again; the checkpoint's :class:`~orchestrator.data.DataPosition` holds the samples already trained on from
them, and they are filtered out here. Batches are re-cut to this worker's exact share of the global
batch (ranks may differ by one sample when the global batch does not divide by the worker count); when one rank's split runs dry, all ranks stop together.
"""

from __future__ import annotations

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


class TrainBatches:
    """Fixed-size ``(images, tokens)`` batches for this worker, resuming at ``position``.

    :meth:`position` is collective (all ranks call it at checkpoints): it merges every rank's consumed
    samples of the partly consumed shards with the stream's shard-level progress.
    """

    def __init__(self, cfg: RunConfig, device: torch.device, dtype: torch.dtype, position: DataPosition):
        import ray.train

        self.cfg, self.device, self.dtype = cfg, device, dtype
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.batch_size = cfg.worker_batch_size(context.get_world_size(), self.rank)  # the global batch at any count
        self.monitor_name = current_monitor(cfg)
        self.shard = ray.train.get_dataset_shard("train")
        self.shard_names = stream_visit_names(self.monitor_name)  # visit index -> position key
        self.saved = position  # the last position this run saved (or resumed from)
        self.skip = position.consumed_ordinals()  # (epoch, shard name) -> ordinals trained on before the resume
        self.consumed: dict[tuple[int, str], list[int]] = defaultdict(list)
        self.auditing = cfg.checkpoint.audit_sample_ids
        self.new_audit: list[str] = []
        self.filtered_repeats = 0

    def _rows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[int, str], int]]:
        for batch in iter_train_batches(self.shard, self.cfg.data, self.monitor_name, rank=self.rank):
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
