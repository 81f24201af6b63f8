"""Evaluation of a CLIP model the way CLIP is judged: zero-shot classification, retrieval, linear probe.

Who runs what (module: process):

* ``sets`` (layouts: CLIP_benchmark's WebDataset, image folders, rayclip shards), ``model_source`` (``--model``),
  ``job`` (``jobs/evaluate.py``: table, JSON, MLflow): the evaluation's driver;
* ``readers`` (a part of a set -> samples): Ray Data read tasks, or each Train worker;
* ``encode`` (samples -> normalised features): Ray Data actors holding the model, or each Train worker;
* ``pipeline``: the Ray Data feature source (driver plans, tasks read, actors encode);
* ``in_loop``: the Train workers as the feature source, for evaluation during pretraining;
* ``tasks`` (zero-shot, retrieval, linear probe on any feature source), ``results``, ``probe``: wherever the
  features arrive (the driver, or the Train workers and their rank 0).
"""

from orchestrator.facade import lazy_facade

__all__, __getattr__, __dir__ = lazy_facade(__name__, {
    ".encode": ("FeatureEncoder", "Preprocess"),
    ".in_loop": ("InLoopEvaluation", "WorkerFeatures"),
    ".job": ("EvaluationOptions", "format_table", "prepare", "run_evaluation"),
    ".model_source": ("LoadedModel", "ModelSourceError", "load_model", "load_model_file"),
    ".pipeline": ("RayDataFeatures",),
    ".probe": ("ProbeResult", "linear_probe as fit_linear_probe"),
    ".readers": ("EvalSample", "limit_set", "read_part"),
    ".results": ("EvalResult", "ZeroShotCounts"),
    ".sets": ("EvalSet", "EvalSetError", "SetPart", "for_task", "open_eval_set", "set_name_for"),
    ".tasks": ("FeatureSource", "ImageBatch", "OpenedSet", "linear_probe", "open_set", "retrieval", "run_task",
               "zero_shot"),
})
