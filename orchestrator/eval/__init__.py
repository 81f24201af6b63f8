"""Evaluation of a CLIP model: zero-shot classification, sharded over the training workers.

Runs where the model is: inside the Train workers' loop (periodic and final evaluation).
"""

from orchestrator.eval.zero_shot import LabelledImages, ZeroShotResult, evaluate_zero_shot, load_eval_set

__all__ = ["LabelledImages", "ZeroShotResult", "evaluate_zero_shot", "load_eval_set"]
