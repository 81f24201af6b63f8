"""MLflow tracking: one run per pretraining job, created by the job's driver and logged from rank 0 of the Train workers.

``run_tracker`` (the run: params, metrics, plots, the exported model, its registration), ``outbox`` (writes
queued and retried while the store does not answer), ``run_lifecycle`` (the driver: the store checked, the run
created before Ray starts, closed when the workers cannot), ``evaluation``
(an evaluation's metric names and figures), ``experiments``
(the experiment and where its artifacts live), ``params`` (config -> params), ``plots`` (figures).
"""

from orchestrator.facade import lazy_facade

__all__, __getattr__, __dir__ = lazy_facade(__name__, {
    ".experiments": ("EXPERIMENT_KIND_TAG", "MODEL_TRAINING_KIND", "default_artifact_location", "ensure_experiment",
                     "is_temporary"),
    ".params": ("MAX_PARAM_VALUE_CHARS", "MAX_PARAMS_PER_BATCH", "flatten_config", "param_batches"),
    ".evaluation": ("CONFUSION_MAX_CLASSES", "HEADLINE_METRIC", "EvaluationResult", "evaluation_figures",
                    "evaluation_metrics", "metric_key"),
    ".plots": ("render_confusion_matrix", "render_metric_curve", "render_metric_vs_param", "render_per_class",
               "render_recall_at_k", "render_trial_curves"),
    ".outbox": ("Outbox", "OutboxReport"),
    ".run_lifecycle": ("TrackingUnreachable", "check_store", "create_run", "end_run"),
    ".run_tracker": ("RunTracker", "TrackingSettings"),
})
