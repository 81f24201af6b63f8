"""MLflow tracking: one run per pretraining job, logged from rank 0 of the Train workers.

``run_tracker`` (the run: params, metrics, plots, the exported model, its registration), ``evaluation``
(an evaluation's metric names and figures), ``experiments``
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
from orchestrator.tracking.evaluation import (
    CONFUSION_MAX_CLASSES,
    HEADLINE_METRIC,
    EvaluationResult,
    evaluation_figures,
    evaluation_metrics,
    metric_key,
)
from orchestrator.tracking.plots import (
    render_confusion_matrix,
    render_metric_curve,
    render_metric_vs_param,
    render_per_class,
    render_recall_at_k,
    render_trial_curves,
)
from orchestrator.tracking.run_tracker import RunTracker, TrackingSettings

__all__ = [
    "CONFUSION_MAX_CLASSES",
    "HEADLINE_METRIC",
    "EvaluationResult",
    "evaluation_figures",
    "evaluation_metrics",
    "metric_key",
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
    "render_confusion_matrix",
    "render_metric_curve",
    "render_metric_vs_param",
    "render_per_class",
    "render_recall_at_k",
    "render_trial_curves",
]
