"""An evaluation in MLflow: metric names and figures for one set's result (pretraining runs and ``jobs/evaluate.py``).

Metrics go under ``eval/<set>/<metric>`` (``eval/imagenet/zeroshot_top1``); figures under ``eval/<set>/``:
per-class accuracy (``per_class_step_N.png``), the confusion matrix up to ``CONFUSION_MAX_CLASSES`` classes
(``confusion_step_N.png``), recall@K (``recall_at_k_step_N.png``) and the headline metric over training
steps (``curve.png``, redrawn from the whole history).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
from matplotlib.figure import Figure

from orchestrator.tracking.plots import render_confusion_matrix, render_metric_curve, render_per_class, render_recall_at_k

CONFUSION_MAX_CLASSES = 100  # a larger matrix is unreadable as a picture; the results file keeps it
HEADLINE_METRIC = {"zeroshot": "zeroshot_top1", "retrieval": "image_to_text_recall_at_1",
                   "linear-probe": "linear_probe_top1", "contrastive-loss": "contrastive_loss"}
_TASK_TITLE = {"zeroshot": "zero-shot", "retrieval": "retrieval", "linear-probe": "linear probe",
               "contrastive-loss": "held-out contrastive loss"}


class EvaluationResult(Protocol):
    """What an evaluation result offers tracking (``orchestrator.eval.EvalResult`` fits)."""

    set_name: str
    task: str
    metrics: dict[str, float]
    class_names: list[str]
    confusion: np.ndarray | None
    per_class: dict[str, float]


def metric_key(set_name: str, metric: str) -> str:
    return f"eval/{set_name}/{metric}"


def evaluation_metrics(result: EvaluationResult) -> dict[str, float]:
    """The result's metrics under their MLflow names."""
    return {metric_key(result.set_name, name): float(value) for name, value in result.metrics.items()}


def headline_key(result: EvaluationResult) -> str:
    return metric_key(result.set_name, HEADLINE_METRIC[result.task])


def check_evaluation(result: EvaluationResult) -> None:
    """Raise ValueError for a result its figures cannot show (a confusion matrix that does not match the classes)."""
    confusion = result.confusion
    if confusion is not None and len(result.class_names) <= CONFUSION_MAX_CLASSES:
        if np.asarray(confusion).shape != (len(result.class_names),) * 2:
            raise ValueError(f"confusion has shape {np.asarray(confusion).shape}, expected "
                             f"({len(result.class_names)}, {len(result.class_names)}) for {len(result.class_names)} class names")


def evaluation_figures(result: EvaluationResult, step: int, history: list[tuple[int, float]]) -> dict[str, Figure]:
    """File name -> figure for this result (``history``: the headline metric by step, this step included)."""
    check_evaluation(result)
    title = f"{result.set_name} {_TASK_TITLE[result.task]}"
    figures = {}
    if result.per_class:
        metric = "recall" if result.task == "zeroshot" else "accuracy"
        figures[f"per_class_step_{step:08d}.png"] = render_per_class(result.per_class, f"per-class {metric}", title)
    if result.confusion is not None and len(result.class_names) <= CONFUSION_MAX_CLASSES:
        figures[f"confusion_step_{step:08d}.png"] = render_confusion_matrix(np.asarray(result.confusion),
                                                                            result.class_names, step, title)
    if result.task == "retrieval":
        figures[f"recall_at_k_step_{step:08d}.png"] = render_recall_at_k(_recall_by_direction(result.metrics), title)
    if history:
        figures["curve.png"] = render_metric_curve(history, HEADLINE_METRIC[result.task], title)
    return figures


def _recall_by_direction(metrics: Mapping[str, float]) -> dict[str, dict[int, float]]:
    by_direction: dict[str, dict[int, float]] = {}
    for name, value in metrics.items():
        direction, _, k = name.partition("_recall_at_")
        if k.isdigit():
            by_direction.setdefault(direction.replace("_to_", "->"), {})[int(k)] = value
    return by_direction
