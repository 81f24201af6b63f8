"""Evaluation inside pretraining: the Train workers are the feature source (runs in every Train worker).

During pretraining the workers hold the accelerators, and under ZeRO-3 the parameters exist only as
partitions across them, so the workers themselves run the towers: each streams its share of a set's
parts (every world_size-th shard: each is read once) and encodes it. Every forward is collective under ZeRO-3, so workers step in lockstep: before each batch
they agree (one all-reduce) whether anyone still has data, and a worker with none runs an empty batch.
What follows the features is :mod:`orchestrator.eval.tasks`, as in ``jobs/evaluate.py``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from orchestrator.collectives import all_reduce_sum, gather_objects_to_chief
from orchestrator.config import EvalSetConfig, RunConfig
from orchestrator.eval.encode import FeatureEncoder
from orchestrator.eval.readers import EvalSample, read_part
from orchestrator.eval.results import EvalResult
from orchestrator.eval.sets import EvalSet
from orchestrator.eval.tasks import ImageBatch, OpenedSet, open_set, run_task


class WorkerFeatures:
    """One Train worker's share of a set, encoded with its own module (collective: every rank calls)."""

    def __init__(self, encoder: FeatureEncoder, *, rank: int, world_size: int, batch_size: int):
        self.encoder, self.rank, self.world_size, self.batch_size = encoder, rank, world_size, batch_size

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        # Every rank encodes every text in the same chunks: the same forwards everywhere, the same result.
        chunks = [self.encoder.text_features(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return torch.cat(chunks) if chunks else self.encoder.text_features([])

    def _my_samples(self, eval_set: EvalSet) -> Iterator[EvalSample]:
        """Every world_size-th part: each shard is read once over all workers (with fewer shards than
        workers, some workers only join the forwards)."""
        for part in eval_set.parts[self.rank::self.world_size]:
            for block in read_part(eval_set, part):
                yield from block

    def image_batches(self, eval_set: EvalSet, *, captions: bool = False) -> Iterator[ImageBatch]:
        samples = self._my_samples(eval_set)
        while True:
            chunk, bad = _next_chunk(samples, self.batch_size)
            anyone = all_reduce_sum(torch.tensor([1.0 if chunk or bad else 0.0]))
            if float(anyone) == 0:
                return
            yield self._encode(chunk, bad, captions)

    def _encode(self, chunk: list[EvalSample], bad: Counter, captions: bool) -> ImageBatch:
        pixels = self.encoder.pixels([sample.image for sample in chunk])
        features = self.encoder.image_features(pixels.images)  # an empty batch still joins the forward
        good = [sample for sample, ok in zip(chunk, pixels.decoded) if ok]
        if len(good) < len(chunk):
            bad["undecodable_image"] += len(chunk) - len(good)
        batch = ImageBatch(features, torch.tensor([s.label for s in good], dtype=torch.long),
                           torch.tensor([s.sample_id for s in good], dtype=torch.long), bad=bad)
        if captions:
            texts = [caption for sample in good for caption in sample.captions]
            flat = self.encoder.text_features(texts)
            batch.caption_features = list(flat.split([len(sample.captions) for sample in good]))
        return batch

    def sum_over_ranks(self, totals: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(totals)

    def gather_to_chief(self, value):
        return gather_objects_to_chief(value)


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
                opened = self.open(set_cfg)
                source = WorkerFeatures(encoder, rank=rank, world_size=world_size, batch_size=self.cfg.eval.batch_size)
                result = run_task(source, opened, logit_scale=logit_scale, batch_size=self.cfg.eval.batch_size,
                                  seed=self.cfg.seed)
                if result is not None:
                    results.append(result)
            return results
        finally:
            model.train(was_training)
