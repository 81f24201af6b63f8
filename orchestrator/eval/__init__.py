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

from orchestrator.eval.encode import FeatureEncoder, Preprocess, class_embeddings, prompts
from orchestrator.eval.in_loop import InLoopEvaluation, WorkerFeatures
from orchestrator.eval.job import EvaluationOptions, parse_evaluate_args, prepare, run_evaluation
from orchestrator.eval.model_source import LoadedModel, ModelSourceError, load_model, load_model_file
from orchestrator.eval.pipeline import RayDataFeatures
from orchestrator.eval.probe import ProbeResult, linear_probe as fit_linear_probe
from orchestrator.eval.readers import EvalSample, limit_set, read_part
from orchestrator.eval.results import EvalResult, ZeroShotCounts
from orchestrator.eval.sets import EvalSet, EvalSetError, SetPart, for_task, open_eval_set, set_name_for
from orchestrator.eval.tasks import FeatureSource, ImageBatch, OpenedSet, linear_probe, open_set, retrieval, run_task, zero_shot

__all__ = [
    "EvalResult",
    "EvalSample",
    "EvalSet",
    "EvalSetError",
    "EvaluationOptions",
    "FeatureEncoder",
    "FeatureSource",
    "ImageBatch",
    "InLoopEvaluation",
    "LoadedModel",
    "ModelSourceError",
    "OpenedSet",
    "Preprocess",
    "ProbeResult",
    "RayDataFeatures",
    "SetPart",
    "WorkerFeatures",
    "ZeroShotCounts",
    "class_embeddings",
    "fit_linear_probe",
    "for_task",
    "limit_set",
    "linear_probe",
    "load_model",
    "load_model_file",
    "open_eval_set",
    "open_set",
    "parse_evaluate_args",
    "prepare",
    "prompts",
    "read_part",
    "retrieval",
    "run_evaluation",
    "run_task",
    "set_name_for",
    "zero_shot",
]
