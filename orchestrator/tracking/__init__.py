"""MLflow tracking: one run per pretraining job, logged from rank 0 of the Train workers.

``run_tracker`` (the run: params, metrics, plots, the exported model, its registration), ``experiments``
(the experiment and where its artifacts live), ``params`` (config -> params), ``plots`` (figures).
"""

from orchestrator.tracking.experiments import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    default_artifact_location,
    ensure_experiment,
    is_temporary,
)
from orchestrator.tracking.params import MAX_PARAM_VALUE_CHARS, MAX_PARAMS_PER_BATCH, flatten_config, param_batches
from orchestrator.tracking.plots import render_accuracy_curve, render_confusion_matrix
from orchestrator.tracking.run_tracker import RunTracker, TrackingSettings

__all__ = [
    "EXPERIMENT_KIND_TAG",
    "MAX_PARAMS_PER_BATCH",
    "MAX_PARAM_VALUE_CHARS",
    "MODEL_TRAINING_KIND",
    "RunTracker",
    "TrackingSettings",
    "default_artifact_location",
    "ensure_experiment",
    "flatten_config",
    "is_temporary",
    "param_batches",
    "render_accuracy_curve",
    "render_confusion_matrix",
]
