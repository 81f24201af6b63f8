"""What evaluations accumulate while features stream by, and what they report.

Zero-shot keeps counts only (hits, a confusion matrix), so a 50,000-image set costs a C x C matrix;
retrieval and the linear probe keep features (E floats a sample), never images. Counts add across
Train workers with one all-reduce; features are gathered to rank 0.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

RECALL_KS = (1, 5, 10)
# Every kind of bad sample the readers and the encoder report (summed over ranks as one fixed-length vector).
BAD_SAMPLE_KINDS = ("missing_image", "missing_label", "missing_caption", "unreadable_file", "unreadable_shard",
                    "damaged_shard", "undecodable_image")


class ZeroShotCounts:
    """Running top-1 / top-5 hits and the (true, predicted) confusion matrix over ``classes`` classes."""

    def __init__(self, classes: int):
        self.classes = classes
        self.hits1 = 0
        self.hits5 = 0
        self.confusion = torch.zeros(classes, classes, dtype=torch.float64)

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch's (B, C) scores against its (B,) class indices."""
        if not len(labels):
            return
        top = logits.topk(min(5, self.classes), dim=1).indices  # (B, k)
        self.hits1 += int((top[:, 0] == labels).sum())
        self.hits5 += int((top == labels[:, None]).any(dim=1).sum())
        flat = labels * self.classes + top[:, 0]
        self.confusion += torch.bincount(flat, minlength=self.classes ** 2).view(self.classes, self.classes)

    def as_tensor(self) -> torch.Tensor:
        """Everything in one float64 vector (summed over ranks by one all-reduce)."""
        return torch.cat([torch.tensor([self.hits1, self.hits5], dtype=torch.float64), self.confusion.flatten()])

    def load_tensor(self, totals: torch.Tensor) -> None:
        self.hits1, self.hits5 = int(totals[0]), int(totals[1])
        self.confusion = totals[2:].view(self.classes, self.classes).clone()


@dataclass
class EvalResult:
    """One set's evaluation: its metrics (what MLflow gets, under ``eval/<set>/``) and the plots' data."""

    set_name: str
    task: str
    metrics: dict[str, float]
    images: int
    bad_samples: dict[str, int] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    confusion: np.ndarray | None = None
    """(true class, predicted class) counts, zero-shot only."""
    per_class: dict[str, float] = field(default_factory=dict)
    """Per-class recall (zero-shot) or accuracy (linear probe), by class name."""
    details: dict = field(default_factory=dict)
    """Task-specific extras for the results file (the probe's C sweep, caption counts)."""
    seconds: float | None = None
    """In the training loop: how long the evaluation held training (reading, decoding, forwards, the task)."""

    @property
    def headline(self) -> str:
        """The line a user looks for, e.g. ``imagenet-val zero-shot top-1: 0.756``."""
        m = self.metrics
        if self.task == "zeroshot":
            return f"{self.set_name} zero-shot top-1: {m['zeroshot_top1']:.3f}"
        if self.task == "retrieval":
            return (f"{self.set_name} retrieval recall@1: image->text {m['image_to_text_recall_at_1']:.3f}, "
                    f"text->image {m['text_to_image_recall_at_1']:.3f}")
        if self.task == "contrastive-loss":
            return f"{self.set_name} contrastive loss: {m['contrastive_loss']:.4f}"
        return f"{self.set_name} linear-probe top-1: {m['linear_probe_top1']:.3f}"

    def to_json(self) -> dict:
        return {"set": self.set_name, "task": self.task, "images": self.images, "metrics": self.metrics,
                "bad_samples": self.bad_samples, "per_class": self.per_class, "details": self.details,
                "confusion": self.confusion.tolist() if self.confusion is not None else None,
                "class_names": self.class_names}


def zero_shot_result(set_name: str, counts: ZeroShotCounts, class_names: list[str], bad: Counter) -> EvalResult:
    """Top-1, top-5 and mean per-class recall (the metric CLIP_benchmark reports beside top-1)."""
    confusion = counts.confusion.numpy().astype(np.int64)
    images = int(confusion.sum())
    if images == 0:
        raise ValueError(f"{set_name}: no image could be evaluated (bad samples: {dict(bad) or 'none'})")
    support = confusion.sum(axis=1)
    recall = np.divide(np.diag(confusion), support, out=np.zeros(len(support)), where=support > 0)
    metrics = {"zeroshot_top1": counts.hits1 / images, "zeroshot_top5": counts.hits5 / images,
               "zeroshot_mean_per_class_recall": float(recall[support > 0].mean())}
    per_class = {name: float(value) for name, value, n in zip(class_names, recall, support) if n > 0}
    return EvalResult(set_name, "zeroshot", metrics, images, dict(bad), list(class_names), confusion, per_class)


def retrieval_metrics(recall: dict[str, float]) -> dict[str, float]:
    """``image_to_text_R@5`` -> ``image_to_text_recall_at_5`` (MLflow metric names allow no ``@``)."""
    return {key.replace("_R@", "_recall_at_"): value for key, value in recall.items()}
