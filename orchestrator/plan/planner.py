"""The run plan: the micro-batch that fits, its memory, step time, scaling and cost, for one GPU type.

``plan`` is what ``jobs/plan.py`` prints; ``memory_problems`` and ``choose_micro_batch`` are what the
pretraining job and elastic training call with a validated :class:`RunConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from models import ModelSpec
from orchestrator.batch_split import balanced_micro_batch, worker_shares
from orchestrator.config import RunConfig
from orchestrator.plan.activations import Precision
from orchestrator.plan.checkpoints import UPLOAD_GBPS, CheckpointCost, checkpoint_cost
from orchestrator.plan.gpus import GIB, GPU_TYPES, GpuType, get_gpu_type
from orchestrator.plan.memory import MemoryEstimate, StepShape, TowerLock, estimate_memory
from orchestrator.plan.timing import days_for, measured_mfu, step_time

SCALING_WORLD_SIZES = (8, 64, 256, 1024)
PAPER_SAMPLES = 12.8e9  # 32 epochs of 400M pairs (Radford et al. 2021)


def shape_for(spec: ModelSpec, *, world_size: int, global_batch: int, micro_batch: int, zero_stage: int,
              precision: Precision, grad_checkpointing: bool, locks: tuple[TowerLock, ...] = (),
              patch_dropout: float = 0.0) -> StepShape:
    """The step on the largest worker: its share of the global batch (ranks differ by at most one row)."""
    return StepShape(spec=spec, world_size=world_size, zero_stage=zero_stage, precision=precision,
                     micro_batch=micro_batch, worker_batch=max(worker_shares(global_batch, world_size)),
                     global_batch=global_batch, grad_checkpointing=grad_checkpointing, locks=locks,
                     patch_dropout=patch_dropout)


def config_locks(cfg: RunConfig) -> tuple[TowerLock, ...]:
    """The towers ``cfg`` locks (``model.lock_image``/``lock_text`` with their unlocked layers)."""
    return tuple(TowerLock(tower, unlocked, cfg.model.lock_norm_params) for tower, unlocked in cfg.model.tower_locks)


def largest_micro_batch(shape: StepShape, gpu: GpuType) -> int:
    """The largest micro-batch (up to the worker's share) whose step fits the GPU; 0 when none does.

    Memory grows with the micro-batch, so a bisection finds it; the loss's logits join the activation peak
    only when one chunk holds the whole share, which the search checks at that end separately.
    """
    def fits(micro: int) -> bool:
        return estimate_memory(dataclasses.replace(shape, micro_batch=micro)).total <= gpu.memory_bytes

    if fits(shape.worker_batch):
        return shape.worker_batch
    low, high = 0, shape.worker_batch - 1  # invariant: fits(low) or low == 0; high + 1 does not fit
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low if low and fits(low) else 0


@dataclass(frozen=True)
class GpuFit:
    gpu: str
    largest_micro_batch: int
    micro_batch: int
    accumulation_chunks: int
    total_gib: float


@dataclass(frozen=True)
class Plan:
    """Everything ``jobs/plan.py`` prints; ``to_dict`` is its ``--json``."""

    model: str
    gpu: str
    gpus: int
    global_batch: int
    zero_stage: int
    precision: str
    grad_checkpointing: bool
    locked: list[str]
    """The locked towers, e.g. ["image"] or ["text (last 2 blocks unlocked)"]; [] trains both."""
    trainable_parameters: int
    patch_dropout: float
    micro_batch: int
    accumulation_chunks: int
    per_gpu_memory_gib: dict[str, float]
    memory_by_zero_stage_gib: dict[int, dict[str, float]]
    gpu_fits: list[GpuFit]
    flops_per_sample: float
    mfu: float
    mfu_source: str
    compute_s: float
    zero_comm_s: float
    feature_comm_s: float
    step_time_s: float
    samples_per_s: float
    scaling_efficiency: dict[int, float]
    samples: float
    days: float
    gpu_hours: float
    nodes: int
    gpus_per_node: int
    checkpoint: CheckpointCost

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _gib(estimate: MemoryEstimate) -> dict[str, float]:
    values = {name: round(value / GIB, 3) for name, value in estimate.terms.items()}
    return values | {"allocated": round(estimate.allocated / GIB, 3), "total": round(estimate.total / GIB, 3)}


def plan(spec: ModelSpec, *, gpus: int, gpu_type: str, global_batch: int, flops_per_sample: float,
         zero_stage: int = 1, precision: Precision = "autocast", grad_checkpointing: bool = True,
         micro_batch: int | None = None, mfu: float | None = None, compiled: bool = False,
         samples: float = PAPER_SAMPLES, locks: tuple[TowerLock, ...] = (), patch_dropout: float = 0.0,
         upload_gbps: float = UPLOAD_GBPS) -> Plan:
    """Plan a run of ``spec`` on ``gpus`` GPUs of ``gpu_type``; ``micro_batch=None`` takes the largest that fits.

    ``flops_per_sample`` is :func:`orchestrator.plan.timing.train_flops_per_sample` of the model library's
    forward FLOPs (``models.flops.forward_flops``); the caller passes it because ``models/__init__`` does not
    export the FLOP counter to ``orchestrator``; with ``locks`` it counts a wholly locked tower's forward alone,
    with ``patch_dropout`` the image tower on the tokens it keeps (the same MFU is assumed on fewer tokens).
    Raises ValueError when not even one sample fits.
    """
    gpu = get_gpu_type(gpu_type)
    base = shape_for(spec, world_size=gpus, global_batch=global_batch, micro_batch=1, zero_stage=zero_stage,
                     precision=precision, grad_checkpointing=grad_checkpointing, locks=locks,
                     patch_dropout=patch_dropout)
    fits = [_fit(base, other) for other in GPU_TYPES.values()]
    if micro_batch is None:
        largest = largest_micro_batch(base, gpu)
        if largest == 0:
            raise ValueError(f"{spec.name} does not fit one sample per {gpu.name} at ZeRO-{zero_stage}; "
                             "allowed: a higher --zero-stage, --grad-checkpointing on, more --gpus or a larger GPU")
        micro_batch, _ = balanced_micro_batch(base.worker_batch, largest)
    shape = dataclasses.replace(base, micro_batch=min(micro_batch, base.worker_batch))
    estimate = estimate_memory(shape)
    by_stage = {z: _gib(estimate_memory(dataclasses.replace(shape, zero_stage=z))) for z in range(4)}
    chosen = measured_mfu(spec.name, compiled=compiled) if mfu is None else None
    rate = mfu if mfu is not None else chosen.mfu
    timing = step_time(shape, gpu, flops_per_sample, rate)
    samples_per_s = global_batch / timing.step_s
    days = days_for(samples, samples_per_s)
    return Plan(
        model=spec.name, gpu=gpu.name, gpus=gpus, global_batch=global_batch, zero_stage=zero_stage,
        precision=precision, grad_checkpointing=grad_checkpointing,
        locked=[lock.tower + (f" (last {lock.unlocked_layers} blocks unlocked)" if lock.unlocked_layers else "")
                for lock in locks],
        trainable_parameters=shape.counts.trainable, patch_dropout=patch_dropout, micro_batch=shape.micro_batch,
        accumulation_chunks=shape.chunks, per_gpu_memory_gib=_gib(estimate), memory_by_zero_stage_gib=by_stage,
        gpu_fits=fits, flops_per_sample=flops_per_sample, mfu=rate,
        mfu_source=chosen.source if chosen else "--mfu", compute_s=timing.compute_s, zero_comm_s=timing.zero_comm_s,
        feature_comm_s=timing.feature_comm_s, step_time_s=timing.step_s, samples_per_s=samples_per_s,
        scaling_efficiency=scaling_efficiency(shape, gpu, flops_per_sample, rate), samples=samples, days=days,
        gpu_hours=days * 24 * gpus, nodes=math.ceil(gpus / gpu.gpus_per_node), gpus_per_node=gpu.gpus_per_node,
        checkpoint=checkpoint_cost(shape, upload_gbps),
    )


def _fit(base: StepShape, gpu: GpuType) -> GpuFit:
    largest = largest_micro_batch(base, gpu)
    if largest == 0:
        return GpuFit(gpu.name, 0, 0, 0, 0.0)
    micro, chunks = balanced_micro_batch(base.worker_batch, largest)
    total = estimate_memory(dataclasses.replace(base, micro_batch=micro)).total
    return GpuFit(gpu.name, largest, micro, chunks, round(total / GIB, 2))


def scaling_efficiency(shape: StepShape, gpu: GpuType, flops_per_sample: float, mfu: float) -> dict[int, float]:
    """Weak scaling: the same per-GPU batch and micro-batch on more GPUs; compute time / step time at each size."""
    efficiency = {}
    for world_size in SCALING_WORLD_SIZES:
        scaled = dataclasses.replace(shape, world_size=world_size, global_batch=shape.worker_batch * world_size)
        timing = step_time(scaled, gpu, flops_per_sample, mfu)
        efficiency[world_size] = round(timing.compute_s / timing.step_s, 4)
    return efficiency


def config_shape(cfg: RunConfig, world_size: int) -> StepShape:
    """The step a validated run config trains at ``world_size`` workers (its largest worker's share)."""
    return StepShape(spec=cfg.model.spec(), world_size=world_size, zero_stage=cfg.deepspeed.zero_stage,
                     precision="autocast" if cfg.precision == "bf16" else "fp32",
                     micro_batch=cfg.deepspeed.micro_batch_size, worker_batch=max(cfg.worker_batch_sizes(world_size)),
                     global_batch=cfg.global_batch_size, grad_checkpointing=cfg.model.grad_checkpointing,
                     locks=config_locks(cfg), patch_dropout=cfg.model.patch_dropout)


def memory_problems(cfg: RunConfig, gpu_type: str | None) -> list[str]:
    """Why ``cfg`` cannot fit one ``gpu_type`` GPU at any of its worker counts, one message each; [] when it fits.

    ``gpu_type`` None reads ``scaling.gpu_type``, then ``scaling.accelerator_type``; a CPU run, a GPU type
    not in the table, or a compiled model (``model.compile``) is not checked (returns []). Each message names the largest term, the total and by how much it exceeds the GPU,
    and what would fit.
    """
    key = gpu_type or cfg.scaling.gpu_type or cfg.scaling.accelerator_type
    if not cfg.scaling.use_gpu or key is None or cfg.model.compile:
        # torch.compile is not modelled and frees memory the eager arithmetic counts (ViT-L/14 at micro-batch
        # 256 on an H100: 67 GiB measured compiled, 81 predicted eager): refusing it would refuse runs that fit
        return []
    try:
        gpu = get_gpu_type(key)
    except ValueError:
        return []
    problems = []
    for world_size in sorted({cfg.scaling.min_workers, cfg.scaling.max_workers}):
        shape = config_shape(cfg, world_size)
        estimate = estimate_memory(shape)
        if estimate.total > gpu.memory_bytes:
            problems.append(_refusal(shape, estimate, gpu))
    return problems


def _refusal(shape: StepShape, estimate: MemoryEstimate, gpu: GpuType) -> str:
    movable = {k: v for k, v in estimate.terms.items() if k != "allocator headroom"}
    term = max(movable, key=movable.get)
    label = estimate.labels.get(term, term)
    over = (estimate.total - gpu.memory_bytes) / GIB
    def fits(changed: StepShape) -> bool:
        return estimate_memory(changed).total <= gpu.memory_bytes

    allowed = []  # only changes that fit on their own
    largest = largest_micro_batch(shape, gpu)
    if largest:
        allowed.append(f"deepspeed.micro_batch_size <= {largest}")
    if not shape.grad_checkpointing and fits(dataclasses.replace(shape, grad_checkpointing=True)):
        allowed.append("model.grad_checkpointing: true")
    stage = next((s for s in range(shape.zero_stage + 1, 4) if fits(dataclasses.replace(shape, zero_stage=s))), None)
    if stage is not None:
        allowed.append(f"deepspeed.zero_stage: {stage}")
    return (f"{label} need {movable[term] / GIB:.1f} GiB of the {gpu.name}'s {gpu.memory_gib:.0f} GiB at "
            f"{shape.world_size} workers: the step's total {estimate.total / GIB:.1f} GiB exceeds it by {over:.1f} GiB; "
            f"allowed: {', or '.join(allowed) or 'a larger GPU'}")


def choose_micro_batch(cfg: RunConfig, world_size: int, gpu_type: str) -> tuple[int, int]:
    """(micro-batch, accumulation chunks) for ``world_size`` workers keeping ``cfg``'s global batch on ``gpu_type``.

    The largest micro-batch that fits, never above the config's own ``micro_batch_size``, spread evenly
    over the fewest chunks; for elastic training, where the worker count changes between restarts.
    Raises ValueError when not one sample fits.
    """
    gpu = get_gpu_type(gpu_type)
    shape = config_shape(cfg, world_size)
    largest = min(largest_micro_batch(shape, gpu), cfg.deepspeed.micro_batch_size)
    if largest == 0:
        raise ValueError(f"{cfg.model.name} does not fit one sample per {gpu.name} at {world_size} workers")
    return balanced_micro_batch(shape.worker_batch, largest)
