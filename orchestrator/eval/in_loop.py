"""Evaluation inside pretraining: the Train workers are the feature source (runs in every Train worker).

During pretraining the workers hold the accelerators, and under ZeRO-3 the parameters exist only as
partitions across them, so the workers themselves run the towers: each streams its share of a set
(:func:`share_of_parts`: whole parts, and a slice of the parts left over, so that every worker encodes as many
images as any other) and encodes it. Every forward is collective under ZeRO-3, so workers step in lockstep: before each batch
they agree (one all-reduce) whether anyone still has data, and a worker with none runs an empty batch.
What follows the features is :mod:`orchestrator.eval.tasks`, as in ``jobs/evaluate.py``.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from orchestrator.collectives import all_reduce_sum, gather_objects_to_chief
from orchestrator.config import EvalSetConfig, RunConfig
from orchestrator.eval.encode import FeatureEncoder
from orchestrator.eval.readers import EvalSample, read_part
from orchestrator.eval.results import EvalResult
from orchestrator.eval.sets import EvalSet, SetPart
from orchestrator.eval.tasks import ImageBatch, OpenedSet, open_set, run_task


@dataclass
class DecodedChunk:
    """One batch of a worker's share, decoded: its uint8 images, the samples they are (without their encoded
    bytes) and the bad samples passed on the way."""

    images: torch.Tensor
    samples: list[EvalSample]
    bad: Counter


@dataclass
class DecodedShares:
    """This worker's decoded share of each set split, kept between evaluations within ``budget_bytes`` (all sets
    together); the set is read once per run (a share that does not fit is read and decoded every time)."""

    budget_bytes: int
    kept: dict[str, list[DecodedChunk]] = field(default_factory=dict)
    used_bytes: int = 0

    def room(self) -> int:
        return self.budget_bytes - self.used_bytes

    def keep(self, name: str, chunks: list[DecodedChunk], size: int) -> None:
        self.kept[name], self.used_bytes = chunks, self.used_bytes + size


class WorkerFeatures:
    """One Train worker's share of a set, encoded with its own module (collective: every rank calls).

    With ``decoded``, the share is decoded on the first evaluation only and kept while it fits."""

    def __init__(self, encoder: FeatureEncoder, *, rank: int, world_size: int, batch_size: int,
                 decoded: DecodedShares | None = None):
        self.encoder, self.rank, self.world_size, self.batch_size = encoder, rank, world_size, batch_size
        self.decoded = decoded

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        # Every rank encodes every text in the same chunks: the same forwards everywhere, the same result.
        chunks = [self.encoder.text_features(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return torch.cat(chunks) if chunks else self.encoder.text_features([])

    def _my_samples(self, eval_set: EvalSet) -> Iterator[EvalSample]:
        for share in share_of_parts(eval_set.parts, self.rank, self.world_size):
            for block in read_part(eval_set, share.part):
                yield from (sample for sample in block if sample.ordinal % share.stride == share.offset)

    def image_batches(self, eval_set: EvalSet, *, captions: bool = False) -> Iterator[ImageBatch]:
        key = f"{eval_set.name}/{eval_set.split}"  # a linear probe reads two splits of one set
        kept = self.decoded.kept.get(key) if self.decoded else None
        chunks = iter(kept) if kept is not None else self._decode(eval_set)
        keeping: list[DecodedChunk] | None = [] if kept is None and self.decoded else None
        size = 0
        while True:
            chunk = next(chunks, None)
            anyone = all_reduce_sum(torch.tensor([0.0 if chunk is None else 1.0]))
            if float(anyone) == 0:
                if keeping is not None:
                    self.decoded.keep(key, keeping, size)
                return
            if chunk is None:  # this worker's share is done: it joins the others' forwards with an empty batch
                chunk = DecodedChunk(torch.empty((0, 3, self.encoder.image_size, self.encoder.image_size),
                                                 dtype=torch.uint8), [], Counter())
            elif keeping is not None:
                size += chunk.images.nbytes
                if size <= self.decoded.room():
                    keeping.append(chunk)
                else:  # too big to keep: decoded again next time
                    keeping = None
            yield self._encode(chunk, captions)

    def _decode(self, eval_set: EvalSet) -> Iterator[DecodedChunk]:
        samples = self._my_samples(eval_set)
        while True:
            chunk, bad = _next_chunk(samples, self.batch_size)
            if not chunk and not bad:
                return
            pixels = self.encoder.pixels([sample.image for sample in chunk])
            good = [dataclasses.replace(sample, image=b"") for sample, ok in zip(chunk, pixels.decoded) if ok]
            if len(good) < len(chunk):
                bad["undecodable_image"] += len(chunk) - len(good)
            yield DecodedChunk(pixels.images, good, bad)

    def _encode(self, chunk: DecodedChunk, captions: bool) -> ImageBatch:
        features = self.encoder.image_features(chunk.images)  # an empty batch still joins the forward
        good = chunk.samples
        batch = ImageBatch(features, torch.tensor([s.label for s in good], dtype=torch.long),
                           torch.tensor([s.sample_id for s in good], dtype=torch.long), bad=Counter(chunk.bad))
        if captions:
            texts = [caption for sample in good for caption in sample.captions]
            flat = self.encoder.text_features(texts)
            batch.caption_features = list(flat.split([len(sample.captions) for sample in good]))
        return batch

    def sum_over_ranks(self, totals: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(totals)

    def gather_to_chief(self, value):
        return gather_objects_to_chief(value)


@dataclass(frozen=True)
class PartShare:
    """The samples of ``part`` a worker encodes: those whose ordinal is ``offset`` modulo ``stride``."""

    part: SetPart
    offset: int = 0
    stride: int = 1


def share_of_parts(parts: Sequence[SetPart], rank: int, world_size: int) -> list[PartShare]:
    """What ``rank`` of ``world_size`` workers encodes of a set, every sample by exactly one worker.

    Whole parts go round the workers while every worker gets one more; each part left over (fewer than
    workers) is split by sample among the workers it falls to. With parts of equal size and a leftover count
    that divides the worker count (always so on 2 workers) the shares differ by at most one image per part:
    5 parts of 2,000 on 2 workers give 5,000 each, where whole parts alone gave 6,000 and 4,000. Otherwise no
    worker gets more than with whole parts alone. A worker reads its leftover part whole and skips the other
    workers' samples (reading is cheap next to decoding and encoding); it reads at most one leftover part."""
    whole = len(parts) - len(parts) % world_size
    shares = [PartShare(part) for part in parts[rank:whole:world_size]]
    leftover = parts[whole:]
    if leftover:
        index = rank % len(leftover)
        sharers = range(index, world_size, len(leftover))  # the workers that split this part
        shares.append(PartShare(leftover[index], sharers.index(rank), len(sharers)))
    return shares


def _next_chunk(samples: Iterator[EvalSample], size: int) -> tuple[list[EvalSample], Counter]:
    """Up to ``size`` samples with an image, and the error samples passed on the way."""
    chunk, bad = [], Counter()
    for sample in samples:
        if sample.error:
            bad[sample.error] += 1
            continue
        chunk.append(sample)
        if len(chunk) == size:
            break
    return chunk, bad


@dataclass
class InLoopEvaluation:
    """The run's evaluation sets, opened lazily, and which are due at a step."""

    cfg: RunConfig
    opened: dict[str, OpenedSet] = field(default_factory=dict)
    decoded: DecodedShares | None = None

    def __post_init__(self) -> None:
        if self.decoded is None and self.cfg.eval.keep_decoded_mb:
            self.decoded = DecodedShares(self.cfg.eval.keep_decoded_mb * 2**20)

    def due(self, step: int, *, final: bool = False) -> list[EvalSetConfig]:
        return [s for s in self.cfg.eval_sets() if final or (s.every_steps and step % s.every_steps == 0)]

    def open(self, set_cfg: EvalSetConfig) -> OpenedSet:
        if set_cfg.name not in self.opened:
            self.opened[set_cfg.name] = open_set(set_cfg, self.cfg.data.s3_endpoint_url)
        return self.opened[set_cfg.name]

    def run(self, model, set_cfgs: list[EvalSetConfig], *, rank: int, world_size: int, device, bf16: bool,
            logit_scale: float) -> list[EvalResult]:
        """Evaluate ``model`` on the given sets (collective); zero-shot results on every rank, the others on
        rank 0 only. ``logit_scale`` is the model's exp(t) (read collectively: under ZeRO-3 it is partitioned)."""
        was_training = model.training
        model.eval()
        try:
            encoder = FeatureEncoder(model, device=device, bf16=bf16)
            results = []
            for set_cfg in set_cfgs:
                started = time.perf_counter()
                opened = self.open(set_cfg)
                source = WorkerFeatures(encoder, rank=rank, world_size=world_size, batch_size=self.cfg.eval.batch_size,
                                        decoded=self.decoded)
                result = run_task(source, opened, logit_scale=logit_scale, batch_size=self.cfg.eval.batch_size,
                                  seed=self.cfg.seed)
                if result is not None:
                    result.seconds = time.perf_counter() - started
                    results.append(result)
            return results
        finally:
            model.train(was_training)
