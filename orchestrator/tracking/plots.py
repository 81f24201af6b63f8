"""The plots a run logs: the zero-shot confusion matrix and the accuracy curve (matplotlib, no display)."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_CONFUSION_TICK_LABEL_LIMIT = 40  # above this many classes tick labels are unreadable


def render_confusion_matrix(confusion: np.ndarray, class_names: list[str], step: int) -> Figure:
    """Draw the confusion matrix row-normalised (each true class sums to 1), so rare classes show."""
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=float), where=rows > 0)
    size = min(4 + 0.35 * len(class_names), 20)
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(normalised, vmin=0.0, vmax=1.0, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if len(class_names) <= _CONFUSION_TICK_LABEL_LIMIT:
        ticks = np.arange(len(class_names))
        ax.set_xticks(ticks, labels=class_names, rotation=90)
        ax.set_yticks(ticks, labels=class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"zero-shot confusion, step {step}")
    fig.tight_layout()
    return fig


def render_accuracy_curve(history: list[tuple[int, float, float]]) -> Figure:
    """Draw zero-shot top-1/top-5 accuracy against training step."""
    steps, top1, top5 = zip(*sorted(history)) if history else ((), (), ())
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, top1, marker="o", label="top-1")
    ax.plot(steps, top5, marker="s", label="top-5")
    ax.set_xlabel("step")
    ax.set_ylabel("zero-shot accuracy")
    ax.set_ylim(bottom=0.0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
