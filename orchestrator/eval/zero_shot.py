"""Zero-shot evaluation, sharded over all training workers (runs inside the Train workers' loop).

Every rank classifies an equal slice of the labelled set and the counts are summed across ranks.
All ranks take part (instead of rank 0 alone) because under ZeRO-3 each forward gathers parameter
partitions from every rank, and because it divides the work. Slices are padded to the same number of
batches so that the ranks' collective calls line up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models import build_zero_shot_classifier, normalize_images
from orchestrator.collectives import all_reduce_sum
from orchestrator.config import RunConfig
from orchestrator.data import load_heldout


@dataclass(frozen=True)
class LabelledImages:
    """An evaluation set: preprocessed uint8 images at the model's resolution and their class labels."""

    images: torch.Tensor
    """(N, 3, R, R) uint8."""
    labels: torch.Tensor
    """(N,) int64 class indices into ``class_names``."""
    class_names: list[str]


@dataclass(frozen=True)
class ZeroShotResult:
    top1: float
    top5: float
    confusion: torch.Tensor
    """(true class, predicted class) counts over the whole set."""
    class_names: list[str]
    images: int


def _rank_slice(total: int, rank: int, world_size: int) -> tuple[slice, int]:
    """This rank's contiguous slice and the per-rank row count every rank pads to."""
    per_rank = math.ceil(total / world_size)
    start = min(total, rank * per_rank)
    return slice(start, min(total, start + per_rank)), per_rank


def _local_counts(model, data: LabelledImages, classifier, rows: slice, batches: int, batch_size: int, dtype):
    """(top-1 hits, top-5 hits, confusion) for this rank's rows; runs exactly ``batches`` forwards."""
    device = classifier.device
    classes = len(data.class_names)
    hits1 = torch.zeros((), dtype=torch.float64)
    hits5 = torch.zeros((), dtype=torch.float64)
    confusion = torch.zeros(classes, classes, dtype=torch.float64)
    images, labels = data.images[rows], data.labels[rows]
    for index in range(batches):
        batch = images[index * batch_size : (index + 1) * batch_size]
        padded = batch if len(batch) else data.images[:1]  # an empty slice still joins the collective forward
        pixels = normalize_images(padded.to(device), dtype=dtype)
        features = F.normalize(model.encode_image(pixels).float(), dim=-1)
        if not len(batch):
            continue
        logits = features @ classifier  # (B, C)
        target = labels[index * batch_size : (index + 1) * batch_size].to(device)
        top = logits.topk(min(5, classes), dim=1).indices  # (B, k)
        hits1 += (top[:, 0] == target).sum().cpu()
        hits5 += (top == target[:, None]).any(dim=1).sum().cpu()
        flat = target * classes + top[:, 0]
        confusion += torch.bincount(flat, minlength=classes * classes).view(classes, classes).cpu()
    return hits1, hits5, confusion


@torch.no_grad()
def evaluate_zero_shot(
    model,
    data: LabelledImages,
    tokenizer: Callable[[list[str]], torch.Tensor],
    templates: Sequence[str],
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    dtype: torch.dtype = torch.float32,
) -> ZeroShotResult:
    """Top-1/top-5 zero-shot accuracy and confusion matrix of ``model`` on ``data``, summed over ranks.

    Collective: every rank must call it with the same ``data`` length and ``batch_size``.
    """
    was_training = model.training
    model.eval()
    try:
        classifier = build_zero_shot_classifier(model, tokenizer, data.class_names, templates)  # (E, C)
        rows, per_rank = _rank_slice(len(data.labels), rank, world_size)
        batches = math.ceil(per_rank / batch_size)
        hits1, hits5, confusion = _local_counts(model, data, classifier, rows, batches, batch_size, dtype)
    finally:
        model.train(was_training)
    totals = all_reduce_sum(torch.cat([hits1.view(1), hits5.view(1), confusion.flatten()]))
    count = len(data.labels)
    classes = len(data.class_names)
    return ZeroShotResult(
        top1=float(totals[0]) / count,
        top5=float(totals[1]) / count,
        confusion=totals[2:].view(classes, classes).long(),
        class_names=list(data.class_names),
        images=count,
    )


def load_eval_set(cfg: RunConfig, image_size: int) -> tuple[LabelledImages, list[str]] | None:
    """The held-out labelled images (uint8, resized + center-cropped) and the prompt templates to use
    (``eval.templates``, else the split's own held-out template); None when evaluation is off."""
    if not cfg.eval.enabled:
        return None
    heldout = load_heldout(cfg.data, limit=cfg.eval.max_images)
    images, labels = [], []
    for pixels, batch_labels in heldout.batches(1000, image_size, normalize=False):
        images.append(pixels)
        labels.append(batch_labels)
    templates = cfg.eval.templates or [heldout.template]
    return LabelledImages(torch.cat(images), torch.cat(labels), heldout.class_names), templates
