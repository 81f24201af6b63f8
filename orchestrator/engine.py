"""The model and its DeepSpeed engine, built from the run config on every worker.

DeepSpeed is configured entirely from our typed config (no separate JSON to drift out of sync):
ZeRO stage, bf16 autocast on GPU or fp32 on CPU, gradient clipping, AdamW with the paper's no-decay set, and
our warmup schedule. The optimizer is PyTorch's own AdamW (``torch_adam``): DeepSpeed's fused Adam is a
JIT-compiled extension, which a CPU machine cannot build and a GPU image may lack the compiler for.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from models.clip import CLIP, weight_decay_groups
from orchestrator.config import RunConfig
from orchestrator.schedule import build_lr_scheduler

# Modules whose gradients DeepSpeed may reduce in bf16 under autocast (their matmuls run in bf16 anyway).
BF16_SAFE_MODULES = ["torch.nn.modules.linear.Linear", "torch.nn.modules.conv.Conv2d", "models.transformer.SelfAttention"]


def build_model(cfg: RunConfig) -> CLIP:
    """A freshly initialised CLIP with the run's temperature settings (same weights on every rank)."""
    spec = dataclasses.replace(
        cfg.model.spec(),
        init_logit_scale=math.log(1.0 / cfg.loss.init_temperature),
        max_logit_scale=cfg.loss.max_logit_scale,
    )
    torch.manual_seed(cfg.seed)
    model = CLIP(spec)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(vision=True, text=True)
    model.logit_scale.requires_grad_(cfg.loss.learn_temperature)
    return model


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict equivalent to the run config's optim/deepspeed sections."""
    ds = cfg.deepspeed
    betas, eps = cfg.adam_betas_eps()
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": ds.grad_accum_steps,
        "train_batch_size": ds.micro_batch_size * ds.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optim.grad_clip_norm or 0.0,
        "zero_optimization": zero,
        # bf16 runs as torch.autocast over fp32 weights (DeepSpeed's torch_autocast), not as DeepSpeed's
        # "bf16" section (bf16 weights): 1.54x faster on an H100 for ViT-L/14 (benchmarks/gpu_step.py).
        "torch_autocast": {
            "enabled": cfg.precision == "bf16",
            "dtype": "bfloat16",
            "lower_precision_safe_modules": BF16_SAFE_MODULES,
        },
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.lr,
                "betas": list(betas),
                "eps": eps,
                "weight_decay": cfg.optim.weight_decay,
                "torch_adam": True,
                "fused": True,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: RunConfig, model: CLIP, world_size: int, *, load_universal: bool = False):
    """``deepspeed.initialize`` with our optimizer groups and schedule; returns the engine.

    ``load_universal``: the engine will load a universal checkpoint (one converted for another worker
    count, see ``orchestrator.checkpoint``).
    """
    import deepspeed

    def scheduler(optimizer):
        return build_lr_scheduler(
            optimizer,
            kind=cfg.schedule.kind,
            warmup_steps=cfg.schedule.warmup_steps,
            total_steps=cfg.schedule.total_steps,
            min_lr_ratio=cfg.schedule.min_lr_ratio,
        )

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=weight_decay_groups(model, cfg.optim.weight_decay),
        config={**deepspeed_config(cfg, world_size), "checkpoint": {"load_universal": load_universal}},
        lr_scheduler=scheduler,
    )
    if cfg.model.compile:
        engine.compile()  # compiles the module's forward in place: state-dict keys and checkpoints unchanged
    return engine


def clamp_logit_scale(engine, max_logit_scale: float) -> None:
    """Clamp the stored log-temperature to [0, log(max)] in the optimizer's master copy too.

    Under ZeRO the fp32 master weights live in the optimizer's flat partitions, so clamping
    ``module.logit_scale`` alone would be overwritten by the next step. ZeRO 1/2: DeepSpeed's
    ``safe_*_full_fp32_param`` reassemble and scatter the master value (collective). ZeRO-3: the
    1-element parameter is partitioned (DeepSpeed's full setter fails on its padded partition), so each
    rank clamps its own master and parameter partitions in place. Without ZeRO the optimizer updates
    the parameter itself. Every rank calls this.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_full_fp32_param

    parameter = engine.module.logit_scale
    if not parameter.requires_grad:
        return
    upper = math.log(max_logit_scale)
    with torch.no_grad():
        if hasattr(parameter, "ds_tensor"):  # ZeRO-3
            safe_get_local_fp32_param(parameter).clamp_(0.0, upper)  # a view into the master partition
            parameter.ds_tensor.clamp_(0.0, upper)
            return
        master = safe_get_full_fp32_param(parameter)
        if master is None:
            parameter.clamp_(0.0, upper)
        elif not torch.equal(master.clamp(0.0, upper), master):
            safe_set_full_fp32_param(parameter, master.clamp(0.0, upper))
