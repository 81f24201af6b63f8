"""The run planner: per-GPU memory, micro-batch, step time and cost of a run before it is launched.

What other packages may use. Modules: ``gpus`` (the GPU table), ``activations`` (per-sample activation
bytes from the model spec), ``memory`` (every per-GPU term), ``timing`` (FLOPs, communication, step
time), ``checkpoints`` (a checkpoint's bytes per rank and the time training stops for it), ``planner`` (the plan,
the refusal messages, the elastic micro-batch), ``report`` (text, JSON and the run config ``jobs/plan.py``
writes). The real CPU steps that check the arithmetic are ``harness.measure``, outside the library.
"""

from orchestrator.facade import lazy_facade

__all__, __getattr__, __dir__ = lazy_facade(__name__, {
    ".activations": ("PRECISIONS", "Precision"),
    ".checkpoints": ("UPLOAD_GBPS", "CheckpointCost", "checkpoint_cost", "rank_bytes"),
    ".gpus": ("GIB", "GPU_TYPES", "GpuType", "get_gpu_type"),
    ".memory": ("MemoryEstimate", "StepShape", "TowerLock", "estimate_memory", "parameter_counts"),
    ".planner": ("PAPER_SAMPLES", "Plan", "choose_micro_batch", "config_locks", "config_shape", "largest_micro_batch",
                 "memory_problems", "plan", "shape_for"),
    ".report": ("PlanArgumentError", "PlanRequest", "check_request", "config_error_types", "format_plan",
                "plan_request", "run_config_yaml", "to_json"),
    ".timing": ("collective_payloads", "measured_mfu", "train_flops_per_sample"),
})
