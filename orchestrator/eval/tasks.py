"""The three evaluations, written once against a :class:`FeatureSource`: zero-shot, retrieval, linear probe.

A feature source turns texts and a set's images into normalised features. ``jobs/evaluate.py`` uses
Ray Data actors that hold the model (:class:`~orchestrator.eval.pipeline.RayDataFeatures`); the
pretraining loop uses its own Train workers (:class:`~orchestrator.eval.in_loop.WorkerFeatures`), each
streaming its share of the set. Everything after the features (the classifier, the counts, recall, the
probe, the result) is this module, for both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from models import ClipLoss, retrieval_recall, zero_shot_class_embeddings
from orchestrator.eval.probe import linear_probe as fit_linear_probe
from orchestrator.eval.results import BAD_SAMPLE_KINDS, RECALL_KS, EvalResult, ZeroShotCounts, retrieval_metrics, zero_shot_result
from orchestrator.config import EvalSetConfig
from orchestrator.eval.readers import limit_set
from orchestrator.eval.sets import EvalSet, for_task, open_eval_set


@dataclass
class ImageBatch:
    """Features of a batch of good samples, and the bad samples met on the way (by kind)."""

    features: torch.Tensor
    """(B, E) float32, L2-normalised."""
    labels: torch.Tensor
    """(B,) class indices (-1 in retrieval sets)."""
    sample_ids: torch.Tensor
    """(B,) ids unique within the set (part << 32 | ordinal)."""
    caption_features: list[torch.Tensor] = field(default_factory=list)
    """Retrieval: per image, (captions, E) float32 normalised features."""
    bad: Counter = field(default_factory=Counter)


class FeatureSource(Protocol):
    """Where features come from; collectives are no-ops where one process sees everything."""

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(T, E) normalised features of ``texts``, in order, on every process that calls it."""

    def image_batches(self, eval_set: EvalSet, *, captions: bool = False) -> Iterator[ImageBatch]:
        """This process's share of the set's images as feature batches (with caption features)."""

    def sum_over_ranks(self, totals: torch.Tensor) -> torch.Tensor:
        """``totals`` summed over every process that computes a share."""

    def gather_to_chief(self, value) -> list | None:
        """Every share's ``value`` on the chief; None on the others."""


def _merge_bad(counters: list[Counter]) -> Counter:
    merged = Counter()
    for counter in counters:
        merged.update(counter)
    return +merged  # drops kinds counted zero times


def zero_shot(source: FeatureSource, eval_set: EvalSet, templates: Sequence[str] | None = None) -> EvalResult:
    """Top-1/top-5/mean per-class recall with the paper's prompt ensemble (``models.zero_shot_class_embeddings``;
    on every rank)."""
    templates = list(templates or eval_set.templates)
    classes = len(eval_set.class_names)
    classifier = zero_shot_class_embeddings(source.text_features, eval_set.class_names, templates)  # (C, E)
    counts, bad = ZeroShotCounts(classes), Counter()
    for batch in source.image_batches(eval_set):
        counts.add(batch.features @ classifier.T, batch.labels)  # (B, C) cosine similarities
        bad.update(batch.bad)
    counts.load_tensor(source.sum_over_ranks(counts.as_tensor()))
    bad_totals = source.sum_over_ranks(torch.tensor([bad[kind] for kind in BAD_SAMPLE_KINDS], dtype=torch.float64))
    bad = Counter({kind: int(n) for kind, n in zip(BAD_SAMPLE_KINDS, bad_totals.tolist()) if n})
    result = zero_shot_result(eval_set.name, counts, eval_set.class_names, bad)
    result.details = {"templates": len(templates), "layout": eval_set.layout, "split": eval_set.split, "url": eval_set.url}
    return result


@dataclass
class Gathered:
    """A set's features from every share, in sample-id order (the result does not depend on who read what)."""

    features: torch.Tensor
    labels: torch.Tensor
    caption_features: list[torch.Tensor]
    bad: Counter


def gather_features(source: FeatureSource, eval_set: EvalSet, *, captions: bool = False) -> Gathered | None:
    """Every image's features (and label, and captions' features) on the chief; None on the others."""
    features, labels, ids, caption_features, bad = [], [], [], [], Counter()
    for batch in source.image_batches(eval_set, captions=captions):
        features.append(batch.features)
        labels.append(batch.labels)
        ids.append(batch.sample_ids)
        caption_features.extend(batch.caption_features)
        bad.update(batch.bad)
    shares = source.gather_to_chief((features, labels, ids, caption_features, bad))
    if shares is None:
        return None
    order = torch.cat([i for share in shares for i in share[2]] or [torch.zeros(0, dtype=torch.long)]).argsort()
    everyone_captions = [c for share in shares for c in share[3]]
    return Gathered(torch.cat([f for share in shares for f in share[0]] or [torch.zeros(0, 1)])[order],
                    torch.cat([y for share in shares for y in share[1]] or [torch.zeros(0, dtype=torch.long)])[order],
                    [everyone_captions[i] for i in order.tolist()] if captions else [],
                    _merge_bad([share[4] for share in shares]))


def retrieval(source: FeatureSource, eval_set: EvalSet) -> EvalResult | None:
    """Image->text and text->image recall@1/5/10 with every caption of every image (on the chief)."""
    gathered = gather_features(source, eval_set, captions=True)
    if gathered is None:
        return None
    if not len(gathered.features):
        raise ValueError(f"{eval_set.name}: no image could be evaluated (bad samples: {dict(gathered.bad) or 'none'})")
    counts = torch.tensor([len(c) for c in gathered.caption_features])
    caption_image = torch.repeat_interleave(torch.arange(len(counts)), counts)  # (captions,) -> its image's row
    recall = retrieval_recall(gathered.features, torch.cat(gathered.caption_features), RECALL_KS,
                              text_image=caption_image)
    return EvalResult(eval_set.name, "retrieval", retrieval_metrics(recall), len(gathered.features),
                      dict(gathered.bad), details={"captions": len(caption_image), "layout": eval_set.layout,
                                                   "split": eval_set.split, "url": eval_set.url})


def contrastive_loss(source: FeatureSource, eval_set: EvalSet, *, logit_scale: float,
                     batch_size: int) -> EvalResult | None:
    """The paper's symmetric contrastive loss on held-out pairs, each image with its first caption, in batches
    of ``batch_size`` pairs in sample-id order (the remainder is left out when a full batch exists, so every
    batch has the same number of negatives), at the model's temperature ``logit_scale`` (on the chief)."""
    gathered = gather_features(source, eval_set, captions=True)
    if gathered is None:
        return None
    pairs = len(gathered.features)
    if not pairs:
        raise ValueError(f"{eval_set.name}: no image could be evaluated (bad samples: {dict(gathered.bad) or 'none'})")
    texts = torch.stack([captions[0] for captions in gathered.caption_features])  # (N, E)
    size = min(batch_size, pairs)
    losses = [ClipLoss()(gathered.features[start:start + size], texts[start:start + size], torch.tensor(logit_scale))
              for start in range(0, pairs - size + 1, size)]
    return EvalResult(eval_set.name, "contrastive-loss", {"contrastive_loss": float(torch.stack(losses).mean())},
                      size * len(losses), dict(gathered.bad),
                      details={"batch_size": size, "logit_scale": logit_scale, "layout": eval_set.layout,
                               "split": eval_set.split, "url": eval_set.url})


def linear_probe(source: FeatureSource, train_set: EvalSet, test_set: EvalSet, *, seed: int = 0) -> EvalResult | None:
    """The paper's linear probe: C swept on a validation part of train, refit, top-1 on test (on the chief)."""
    if train_set.class_names != test_set.class_names:
        raise ValueError(f"{test_set.name}: the train split ({train_set.url}) and test split ({test_set.url}) "
                         "name different classes")
    train, test = gather_features(source, train_set), gather_features(source, test_set)
    if train is None or test is None:
        return None
    train_x, train_y, test_x, test_y = (t.numpy() for t in (train.features, train.labels, test.features, test.labels))
    if not len(test_x):
        raise ValueError(f"{test_set.name}: no test image could be evaluated")
    classes = len(test_set.class_names)
    probe = fit_linear_probe(train_x, train_y, test_x, test_y, classes=classes, seed=seed)
    per_class = {name: float(value) for name, value in zip(test_set.class_names, probe.per_class) if not np.isnan(value)}
    details = {"C": probe.best_c, "validation_top1": probe.validation_top1,
               "sweep_log10_C": {f"{c:+.3f}": score for c, score in sorted(probe.sweep.items())},
               "train_samples": probe.train_samples, "validation_samples": probe.validation_samples,
               "train_split": train_set.url, "test_split": test_set.url}
    bad = dict(_merge_bad([train.bad, test.bad]))
    return EvalResult(test_set.name, "linear-probe", {"linear_probe_top1": probe.top1, "linear_probe_C": probe.best_c},
                      probe.test_samples, bad, list(test_set.class_names), per_class=per_class, details=details)


@dataclass
class OpenedSet:
    """An evaluation set's splits, found and checked for its task (the test split; the probe's train split)."""

    config: EvalSetConfig
    test: EvalSet
    train: EvalSet | None = None


def open_set(set_cfg: EvalSetConfig, default_endpoint: str | None = None, *, limit: bool = True) -> OpenedSet:
    """Find the set's splits for its task (``limit``: cut to ``max_images`` / ``max_train_images``)."""
    endpoint = set_cfg.s3_endpoint_url or default_endpoint

    def split(name: str, max_images: int | None) -> EvalSet:
        found = open_eval_set(set_cfg.data, name=set_cfg.name, layout=set_cfg.layout, split=name,
                              classnames=set_cfg.classnames, endpoint_url=endpoint)
        found = for_task(found, set_cfg.task)
        return limit_set(found, max_images) if limit else found

    train = split(set_cfg.train_split, set_cfg.max_train_images) if set_cfg.task == "linear-probe" else None
    return OpenedSet(set_cfg, split(set_cfg.split, set_cfg.max_images), train)


def run_task(source: FeatureSource, opened: OpenedSet, *, logit_scale: float, batch_size: int,
             seed: int = 0) -> EvalResult | None:
    """The set's task on ``source``: the same call in ``jobs/evaluate.py`` and in the training loop
    (``logit_scale``: the model's exp(t), for the contrastive loss; ``batch_size``: its pairs a batch)."""
    task = opened.config.task
    if task == "zeroshot":
        return zero_shot(source, opened.test, opened.config.templates)
    if task == "retrieval":
        return retrieval(source, opened.test)
    if task == "contrastive-loss":
        return contrastive_loss(source, opened.test, logit_scale=logit_scale, batch_size=batch_size)
    return linear_probe(source, opened.train, opened.test, seed=seed)
