"""The plots a run logs (matplotlib, no display): per evaluation set, its confusion matrix, per-class accuracy,
recall@K and its headline metric over training steps."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_CONFUSION_TICK_LABEL_LIMIT = 40  # above this many classes tick labels are unreadable


def render_confusion_matrix(confusion: np.ndarray, class_names: list[str], step: int, title: str = "zero-shot") -> Figure:
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
    ax.set_title(f"{title} confusion, step {step}")
    fig.tight_layout()
    return fig


def render_metric_curve(history: list[tuple[int, float]], metric: str, title: str) -> Figure:
    """Draw one metric against training step (an evaluation set's headline over the run)."""
    steps, values = zip(*sorted(history)) if history else ((), ())
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, values, marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_ylim(bottom=0.0)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def render_per_class(values: dict[str, float], metric: str, title: str) -> Figure:
    """Horizontal bars of a per-class metric, worst class at the top (what to look at first)."""
    items = sorted(values.items(), key=lambda item: item[1])
    fig = Figure(figsize=(7, min(3 + 0.22 * len(items), 60)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(range(len(items)), [value for _, value in items], color="tab:blue")
    ax.set_yticks(range(len(items)), labels=[name for name, _ in items], fontsize=8 if len(items) > 40 else 10)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel(metric)
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def render_recall_at_k(recall: dict[str, dict[int, float]], title: str) -> Figure:
    """Recall@K per retrieval direction (``{"image->text": {1: 0.4, 5: 0.7, 10: 0.8}, ...}``)."""
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for direction, by_k in recall.items():
        ks = sorted(by_k)
        ax.plot(ks, [by_k[k] for k in ks], marker="o", label=direction)
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return fig


_OUTCOME_MARKERS = {"finished": ("o", "tab:green"), "stopped early": ("v", "tab:orange"), "failed": ("x", "tab:red")}


def render_metric_vs_param(points: list[tuple[float, float, str]], param: str, metric: str, *, log_x: bool) -> Figure:
    """A search's trials as points: a searched value against the trial's last metric, marked by outcome."""
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for outcome, (marker, colour) in _OUTCOME_MARKERS.items():
        chosen = [(x, y) for x, y, kind in points if kind == outcome]
        if chosen:
            ax.scatter(*zip(*chosen), marker=marker, color=colour, label=outcome)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(f"{metric} against {param}")
    fig.tight_layout()
    return fig


def render_trial_curves(curves: dict[str, list[tuple[float, float]]], metric: str, time_attr: str) -> Figure:
    """Every trial's metric over its run (a trial ASHA stopped ends early)."""
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, curve in sorted(curves.items()):
        ax.plot(*zip(*curve), marker="o", label=name)
    ax.set_xlabel(time_attr)
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    ax.set_title("trials")
    fig.tight_layout()
    return fig
