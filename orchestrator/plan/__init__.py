"""The run planner: per-GPU memory, micro-batch, step time and cost of a run before it is launched.

What other packages may use. Modules: ``gpus`` (the GPU table), ``activations`` (per-sample activation
bytes from the model spec), ``memory`` (every per-GPU term), ``timing`` (FLOPs, communication, step
time), ``planner`` (the plan, the refusal messages, the elastic micro-batch), ``report`` (text, JSON and the
run config ``jobs/plan.py`` writes), ``measure`` (real CPU steps that check the arithmetic).
"""

from orchestrator.plan.activations import PRECISIONS, Precision
from orchestrator.plan.gpus import GIB, GPU_TYPES, GpuType, get_gpu_type
from orchestrator.plan.memory import MemoryEstimate, StepShape, TowerLock, estimate_memory, parameter_counts
from orchestrator.plan.planner import (
    PAPER_SAMPLES,
    Plan,
    choose_micro_batch,
    config_locks,
    config_shape,
    largest_micro_batch,
    memory_problems,
    plan,
    shape_for,
)
from orchestrator.plan.timing import collective_payloads, measured_mfu, train_flops_per_sample

__all__ = [
    "GIB",
    "GPU_TYPES",
    "PAPER_SAMPLES",
    "PRECISIONS",
    "GpuType",
    "MemoryEstimate",
    "Plan",
    "Precision",
    "StepShape",
    "TowerLock",
    "choose_micro_batch",
    "config_locks",
    "collective_payloads",
    "config_shape",
    "estimate_memory",
    "get_gpu_type",
    "largest_micro_batch",
    "measured_mfu",
    "memory_problems",
    "parameter_counts",
    "plan",
    "shape_for",
    "train_flops_per_sample",
]
