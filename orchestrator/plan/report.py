"""What ``jobs/plan.py`` is asked (:class:`PlanRequest`), its printed tables, its JSON and the run config it writes."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from models import ModelSpec, forward_flops, get_model_spec, list_models
from orchestrator.config import ConfigError, RunConfig, ScheduleConfig, load_config
from orchestrator.plan.activations import PRECISIONS
from orchestrator.plan.checkpoints import UPLOAD_GBPS
from orchestrator.plan.gpus import GPU_TYPES
from orchestrator.plan.memory import TowerLock
from orchestrator.plan.planner import PAPER_SAMPLES, Plan, config_locks, plan
from orchestrator.plan.timing import CAPTION_TOKENS, train_flops_per_sample

ON_OFF = {"on": True, "off": False}


class PlanArgumentError(ValueError):
    """A flag with a value the planner cannot use; the message names the flag and the allowed values."""


@dataclass(frozen=True)
class PlanRequest:
    """What ``jobs/plan.py`` was asked (its flags, parsed in ``jobs.cli``); ``None``: the config's value, or the default."""

    model: str | None = None
    gpus: int | None = None
    gpu_type: str = "h100"
    global_batch: int | None = None
    config: str | None = None
    micro_batch: int | None = None
    zero_stage: int | None = None
    precision: str | None = None
    grad_checkpointing: str | None = None
    """``on`` or ``off``."""
    lock: tuple[str, ...] = ()
    """Towers planned as locked whole (``image``, ``text``)."""
    patch_dropout: float | None = None
    samples: float = PAPER_SAMPLES
    mfu: float | None = None
    compile: bool = False
    upload_gbps: float = UPLOAD_GBPS
    write_config: str | None = None


def check_request(request: PlanRequest) -> None:
    """Refuse a value the planner cannot use, naming its flag and the allowed values (:class:`PlanArgumentError`)."""
    checks = [
        ("--model", request.model is None or request.model in list_models(), ", ".join(list_models())),
        ("--gpu-type", request.gpu_type.lower() in GPU_TYPES or request.gpu_type.lower() in ("a100", "h100-80gb"),
         ", ".join(GPU_TYPES)),
        ("--gpus", request.gpus is None or request.gpus >= 1, "a count >= 1"),
        ("--global-batch", request.global_batch is None or request.global_batch >= 1, "a count >= 1"),
        ("--micro-batch", request.micro_batch is None or request.micro_batch >= 1, "a count >= 1"),
        ("--zero-stage", request.zero_stage is None or request.zero_stage in (0, 1, 2, 3), "0, 1, 2, 3"),
        ("--precision", request.precision is None or request.precision in PRECISIONS, ", ".join(PRECISIONS)),
        ("--grad-checkpointing", request.grad_checkpointing is None or request.grad_checkpointing in ON_OFF, "on, off"),
        ("--samples", math.isfinite(request.samples) and request.samples > 0, "a finite positive number, e.g. 12.8e9"),
        ("--mfu", request.mfu is None or 0 < request.mfu <= 1, "a fraction in (0, 1]"),
        ("--upload-gbps", math.isfinite(request.upload_gbps) and request.upload_gbps > 0, "a positive number of GB/s"),
        ("--lock", all(tower in ("image", "text") for tower in request.lock), "image, text"),
        ("--patch-dropout", request.patch_dropout is None or 0 <= request.patch_dropout < 1, "a share in [0, 1)"),
    ]
    for flag, ok, allowed in checks:
        if not ok:
            value = getattr(request, flag[2:].replace("-", "_"))
            value = " ".join(value) if isinstance(value, tuple) else value
            raise PlanArgumentError(f"{flag} {value}: allowed: {allowed}")
    if request.write_config and request.precision == "bf16":
        raise PlanArgumentError("--precision bf16 (bf16 weights) cannot be written as a run config: rayclip trains "
                                "bf16 as autocast over fp32 weights; allowed with --write-config: autocast, fp32")


def plan_request(request: PlanRequest) -> tuple[Plan, RunConfig | None]:
    """The plan ``request`` asks for (FLOPs counted on the kept patches, captions of ``CAPTION_TOKENS``, a
    locked tower's backward left out), and its base config (``--config``) if any."""
    spec, chosen, base = resolve(request)
    text_spec = get_model_spec(spec.name, context_length=CAPTION_TOKENS)
    locked = frozenset(lock.tower for lock in chosen["locks"] if lock.unlocked_layers == 0)
    image_flops = forward_flops(spec, patch_dropout=chosen["patch_dropout"])[0]
    flops = train_flops_per_sample((image_flops, forward_flops(text_spec)[1]), locked)
    return plan(spec, flops_per_sample=flops, **chosen), base


def resolve(request: PlanRequest) -> tuple[ModelSpec, dict[str, Any], RunConfig | None]:
    """The model spec, the planner's keyword arguments, and the base config (``--config``) if any."""
    check_request(request)
    base = load_config(request.config, []) if request.config else None
    model = request.model or (base.model.name if base else None)
    gpus = request.gpus or (base.scaling.max_workers if base else None)
    if model is None or gpus is None:
        raise PlanArgumentError("--model and --gpus are needed without --config")
    spec = get_model_spec(model) if base is None or request.model else base.model.spec()
    ds = base.deepspeed if base else None
    chosen = {
        "gpus": gpus,
        "gpu_type": request.gpu_type,
        "global_batch": request.global_batch or (base.global_batch_size if base else 32768),
        "zero_stage": request.zero_stage if request.zero_stage is not None else (ds.zero_stage if ds else 1),
        "precision": request.precision or ("fp32" if base and base.deepspeed.precision == "fp32" else "autocast"),
        "grad_checkpointing": ON_OFF[request.grad_checkpointing] if request.grad_checkpointing else
        (base.model.grad_checkpointing if base else True),
        "micro_batch": request.micro_batch,
        "mfu": request.mfu,
        "compiled": request.compile or bool(base and base.model.compile),
        "samples": request.samples,
        "upload_gbps": request.upload_gbps,
        "locks": tuple(TowerLock(tower) for tower in dict.fromkeys(request.lock)) if request.lock else
        (config_locks(base) if base and not request.model else ()),
        "patch_dropout": request.patch_dropout if request.patch_dropout is not None else
        (base.model.patch_dropout if base and not request.model else 0.0),
    }
    if chosen["global_batch"] < gpus:
        raise PlanArgumentError(f"--global-batch {chosen['global_batch']}: fewer samples than the {gpus} GPUs; "
                                f"allowed: a count >= {gpus}")
    if chosen["patch_dropout"] and spec.vision.kind != "vit":
        raise PlanArgumentError(f"--patch-dropout {chosen['patch_dropout']}: {spec.name} has a {spec.vision.kind} image "
                                "tower; allowed: 0 (patch dropout needs a ViT)")
    return spec, chosen, base


def run_config_yaml(result: Plan, base: RunConfig | None, path: str) -> str:
    """Write the run config of ``result`` (on ``base`` if given) to ``path``; returns the text written."""
    data = base.model_dump(mode="json", exclude={"data": {"batch_size", "image_size", "context_length"}}) if base else {}
    data.setdefault("model", {})["name"] = result.model
    data["model"]["grad_checkpointing"] = result.grad_checkpointing
    for tower in ("image", "text"):
        data["model"][f"lock_{tower}"] = any(locked.startswith(tower) for locked in result.locked)
    data["model"]["patch_dropout"] = result.patch_dropout
    data.setdefault("deepspeed", {}).update(
        zero_stage=result.zero_stage, precision="bf16" if result.precision == "autocast" else "fp32",
        micro_batch_size=result.micro_batch, global_batch_size=result.global_batch, grad_accum_steps=1)
    data.setdefault("scaling", {}).update(num_workers=result.gpus, use_gpu=True)
    if base is None:  # the schedule spans the planned samples (the bare defaults warm up for longer than they run)
        steps = math.ceil(result.samples / result.global_batch)
        data["schedule"] = {"total_steps": steps, "warmup_steps": min(ScheduleConfig().warmup_steps, steps)}
    RunConfig.from_dict(data)  # what pretrain.py would refuse is never written
    header = (f"# jobs/plan.py: {result.model} on {result.gpus} x {result.gpu} ({result.nodes} nodes x "
              f"{result.gpus_per_node} GPUs), micro-batch {result.micro_batch} x {result.accumulation_chunks} chunk(s), "
              f"{result.per_gpu_memory_gib['total']:.1f} GiB per GPU predicted.\n"
              f"# ray_cluster.yaml: GPU worker nodes min_workers/max_workers = {result.nodes} "
              f"({result.gpus} GPUs / {result.gpus_per_node} per node)\n")
    text = header + yaml.safe_dump(data, sort_keys=False)
    try:
        Path(path).write_text(text)
    except OSError as error:
        raise PlanArgumentError(f"--write-config {path}: cannot be written ({error.strerror}); allowed: a file path "
                                "in a writable folder") from None
    return text


def to_json(result: Plan) -> str:
    return json.dumps(result.to_dict(), indent=1)


def format_plan(result: Plan) -> str:
    """The human tables: memory terms by ZeRO stage, micro-batch per GPU type, time, scaling and cost."""
    stages = result.memory_by_zero_stage_gib
    lines = [f"{result.model} on {result.gpus} x {result.gpu}, global batch {result.global_batch}, "
             f"precision {result.precision}, checkpointing {'on' if result.grad_checkpointing else 'off'}, "
             f"micro-batch {result.micro_batch} x {result.accumulation_chunks} chunk(s)"
             + (f", locked: {', '.join(result.locked)} ({result.trainable_parameters / 1e6:.1f}M parameters train)"
                if result.locked else "")
             + (f", patch dropout {result.patch_dropout:g}" if result.patch_dropout else ""),
             "", "per-GPU memory (GiB) by ZeRO stage" + " " * 13 + "".join(f"   ZeRO-{z}" for z in stages)]
    for term in result.per_gpu_memory_gib:
        lines.append(f"  {term:44s}" + "".join(f"{stages[z][term]:9.2f}" for z in stages))
    lines += ["", f"chosen ZeRO-{result.zero_stage}: {result.per_gpu_memory_gib['total']:.2f} GiB per GPU", "",
              "largest micro-batch per GPU type (this ZeRO stage and checkpointing; at most the "
              f"{-(-result.global_batch // result.gpus)}-sample share of each GPU)",
              f"  {'GPU':12s} {'largest':>8s} {'micro':>6s} {'chunks':>7s} {'GiB':>7s}"]
    for fit in result.gpu_fits:
        lines.append(f"  {fit.gpu:12s} {fit.largest_micro_batch:8d} {fit.micro_batch:6d} "
                     f"{fit.accumulation_chunks:7d} {fit.total_gib:7.2f}")
    counted = "3 x forward" + (" on the kept patches" if result.patch_dropout else "") + "".join(f"; the locked {tower}'s forward 1 x" for tower in result.locked
                                      if tower in ("image", "text"))
    lines += ["", f"time: {result.flops_per_sample / 1e9:.1f} GFLOP per sample ({counted}) at MFU "
              f"{result.mfu:.1%} ({result.mfu_source})",
              f"  compute {result.compute_s:.3f} s + ZeRO comm {result.zero_comm_s:.3f} s + feature gather "
              f"{result.feature_comm_s:.3f} s = step {result.step_time_s:.3f} s; {result.samples_per_s:,.0f} samples/s",
              "  weak-scaling efficiency: " + ", ".join(f"{n} GPUs {e:.0%}" for n, e in result.scaling_efficiency.items()),
              f"  {result.samples:.3g} samples: {result.days:.2f} days, {result.gpu_hours:,.0f} GPU-hours "
              f"({result.nodes} nodes x {result.gpus_per_node})"]
    cost = result.checkpoint
    lines += ["", f"checkpoint: {cost.total_bytes / 1e9:.2f} GB in all, {cost.largest_rank_bytes / 1e9:.2f} GB from the "
              f"rank that writes most (ZeRO-{result.zero_stage}); training stops {cost.stall_background_s:.2f} s for it "
              f"with the background upload (checkpoint.background, the default), {cost.stall_upload_first_s:.2f} s "
              f"uploading first (at {cost.upload_gbps:g} GB/s per worker, --upload-gbps)"]
    return "\n".join(lines)


def config_error_types() -> tuple[type[Exception], ...]:
    """What ``jobs/plan.py`` reports as one line with exit status 2."""
    return (PlanArgumentError, ConfigError, OSError, ValueError)
