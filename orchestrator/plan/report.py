"""``jobs/plan.py``'s command line, its printed tables, its JSON and the run config it writes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from models import ModelSpec, get_model_spec, list_models
from orchestrator.config import ConfigError, RunConfig, load_config
from orchestrator.plan.activations import PRECISIONS
from orchestrator.plan.gpus import GPU_TYPES
from orchestrator.plan.memory import TowerLock
from orchestrator.plan.planner import PAPER_SAMPLES, Plan, config_locks

ON_OFF = {"on": True, "off": False}


class PlanArgumentError(ValueError):
    """A flag with a value the planner cannot use; the message names the flag and the allowed values."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line naming the flag instead of argparse's usage + exit
        raise PlanArgumentError(message)


def parse_plan_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    """The flags of ``jobs/plan.py``; raises :class:`PlanArgumentError` for a bad one."""
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"architecture; allowed: {', '.join(list_models())} (default: --config's)")
    parser.add_argument("--gpus", type=int, help="GPUs (= Ray Train workers; default: --config's scaling.num_workers)")
    parser.add_argument("--gpu-type", default="h100", help=f"allowed: {', '.join(GPU_TYPES)}")
    parser.add_argument("--global-batch", type=int, help="samples per optimizer step (default: --config's, else 32768)")
    parser.add_argument("--config", help="a run config YAML to start from")
    parser.add_argument("--micro-batch", type=int, help="pin the per-GPU micro-batch (default: the largest that fits)")
    parser.add_argument("--zero-stage", type=int, help="0-3 (default: --config's, else 1)")
    parser.add_argument("--precision", help="autocast (rayclip's bf16: autocast over fp32 weights), bf16 "
                        "(bf16 weights + fp32 master, as benchmarks/gpu_step.py --precision bf16), fp32")
    parser.add_argument("--grad-checkpointing", help="on|off (default: --config's, else on)")
    parser.add_argument("--lock", action="append", metavar="TOWER", help="image|text: plan with that tower "
                        "locked whole (LiT; repeatable; default: --config's model.lock_image/lock_text)")
    parser.add_argument("--patch-dropout", type=float, help="FLIP's share of patch tokens dropped, ViTs only "
                        "(default: --config's model.patch_dropout, else 0)")
    parser.add_argument("--samples", type=float, default=PAPER_SAMPLES, help="samples to train (default 12.8e9)")
    parser.add_argument("--mfu", type=float, help="model FLOP utilisation (default: measured, benchmarks/results)")
    parser.add_argument("--compile", action="store_true", help="take the MFU measured with torch.compile")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--write-config", metavar="OUT.yaml", help="write the matching run config")
    args = parser.parse_args(argv)
    _check(args)
    return args


def _check(args: argparse.Namespace) -> None:
    checks = [
        ("--model", args.model is None or args.model in list_models(), ", ".join(list_models())),
        ("--gpu-type", args.gpu_type.lower() in GPU_TYPES or args.gpu_type.lower() in ("a100", "h100-80gb"),
         ", ".join(GPU_TYPES)),
        ("--gpus", args.gpus is None or args.gpus >= 1, "a count >= 1"),
        ("--global-batch", args.global_batch is None or args.global_batch >= 1, "a count >= 1"),
        ("--micro-batch", args.micro_batch is None or args.micro_batch >= 1, "a count >= 1"),
        ("--zero-stage", args.zero_stage is None or args.zero_stage in (0, 1, 2, 3), "0, 1, 2, 3"),
        ("--precision", args.precision is None or args.precision in PRECISIONS, ", ".join(PRECISIONS)),
        ("--grad-checkpointing", args.grad_checkpointing is None or args.grad_checkpointing in ON_OFF, "on, off"),
        ("--samples", args.samples > 0, "a positive number, e.g. 12.8e9"),
        ("--mfu", args.mfu is None or 0 < args.mfu <= 1, "a fraction in (0, 1]"),
        ("--lock", all(tower in ("image", "text") for tower in args.lock or []), "image, text"),
        ("--patch-dropout", args.patch_dropout is None or 0 <= args.patch_dropout < 1, "a share in [0, 1)"),
    ]
    for flag, ok, allowed in checks:
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            value = " ".join(value) if isinstance(value, list) else value
            raise PlanArgumentError(f"{flag} {value}: allowed: {allowed}")
    if args.write_config and args.precision == "bf16":
        raise PlanArgumentError("--precision bf16 (bf16 weights) cannot be written as a run config: rayclip trains "
                                "bf16 as autocast over fp32 weights; allowed with --write-config: autocast, fp32")


def resolve(args: argparse.Namespace) -> tuple[ModelSpec, dict[str, Any], RunConfig | None]:
    """The model spec, the planner's keyword arguments, and the base config (``--config``) if any."""
    base = load_config(args.config, []) if args.config else None
    model = args.model or (base.model.name if base else None)
    gpus = args.gpus or (base.scaling.max_workers if base else None)
    if model is None or gpus is None:
        raise PlanArgumentError("--model and --gpus are needed without --config")
    spec = get_model_spec(model) if base is None or args.model else base.model.spec()
    ds = base.deepspeed if base else None
    chosen = {
        "gpus": gpus,
        "gpu_type": args.gpu_type,
        "global_batch": args.global_batch or (base.global_batch_size if base else 32768),
        "zero_stage": args.zero_stage if args.zero_stage is not None else (ds.zero_stage if ds else 1),
        "precision": args.precision or ("fp32" if base and base.deepspeed.precision == "fp32" else "autocast"),
        "grad_checkpointing": ON_OFF[args.grad_checkpointing] if args.grad_checkpointing else
        (base.model.grad_checkpointing if base else True),
        "micro_batch": args.micro_batch,
        "mfu": args.mfu,
        "compiled": args.compile or bool(base and base.model.compile),
        "samples": args.samples,
        "locks": tuple(TowerLock(tower) for tower in dict.fromkeys(args.lock)) if args.lock else
        (config_locks(base) if base and not args.model else ()),
        "patch_dropout": args.patch_dropout if args.patch_dropout is not None else
        (base.model.patch_dropout if base and not args.model else 0.0),
    }
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
    RunConfig.from_dict(data)  # what pretrain.py would refuse is never written
    header = (f"# jobs/plan.py: {result.model} on {result.gpus} x {result.gpu} ({result.nodes} nodes x "
              f"{result.gpus_per_node} GPUs), micro-batch {result.micro_batch} x {result.accumulation_chunks} chunk(s), "
              f"{result.per_gpu_memory_gib['total']:.1f} GiB per GPU predicted.\n"
              f"# ray_cluster.yaml: GPU worker nodes min_workers/max_workers = {result.nodes} "
              f"({result.gpus} GPUs / {result.gpus_per_node} per node)\n")
    text = header + yaml.safe_dump(data, sort_keys=False)
    Path(path).write_text(text)
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
    return "\n".join(lines)


def config_error_types() -> tuple[type[Exception], ...]:
    """What ``jobs/plan.py`` reports as one line with exit status 2."""
    return (PlanArgumentError, ConfigError, OSError, ValueError)
