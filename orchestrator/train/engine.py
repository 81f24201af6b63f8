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

from models import CLIP, count_parameters, lock_tower, siglip_spec, weight_decay_groups
from orchestrator.config import RunConfig
from orchestrator.logs import get_logger
from orchestrator.train.initial_weights import load_initial_weights
from orchestrator.train.schedule import build_lr_scheduler

logger = get_logger("train")

# Modules whose gradients DeepSpeed may reduce in bf16 under autocast (their matmuls run in bf16 anyway).
BF16_SAFE_MODULES = ["torch.nn.modules.linear.Linear", "torch.nn.modules.conv.Conv2d", "models.transformer.SelfAttention"]


def build_model(cfg: RunConfig) -> CLIP:
    """A freshly initialised CLIP with the run's temperature settings (same weights on every rank); with
    ``loss.kind: siglip`` it carries SigLIP's learnable logit bias. ``model.init_from`` then loads the weights
    of ``model.init_towers``, and ``model.lock_image``/``lock_text`` freeze towers (``models.lock_tower``), so
    the optimizer groups built from the model leave the frozen parameters out."""
    spec = cfg.model.spec()
    if cfg.loss.kind == "siglip":
        spec = dataclasses.replace(siglip_spec(spec), init_logit_bias=cfg.loss.init_bias)
    spec = dataclasses.replace(
        spec,
        init_logit_scale=math.log(1.0 / cfg.loss.init_temperature),
        max_logit_scale=cfg.loss.max_logit_scale,
    )
    torch.manual_seed(cfg.seed)
    model = CLIP(spec)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(vision=True, text=True)
    model.logit_scale.requires_grad_(cfg.loss.learn_temperature)
    first_rank = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if cfg.model.init_from is not None:
        description = load_initial_weights(model, cfg)
        if first_rank:
            logger.info("%s", description)
    for tower, unlocked_layers in cfg.model.tower_locks:
        lock_tower(model, tower, unlocked_layers, norm_stats=cfg.model.lock_norm_stats,
                   norm_params=cfg.model.lock_norm_params)
    if first_rank and cfg.model.tower_locks:
        logger.info("towers locked: %s", count_parameters(model).describe())
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
        "gradient_accumulation_steps": cfg.accumulation_chunks(world_size),
        # DeepSpeed checks train = micro x accumulation x workers; the real global batch may be a little less
        # (uneven shares, see RunConfig.worker_batch_sizes), which DeepSpeed only uses for its own counters.
        "train_batch_size": ds.micro_batch_size * cfg.accumulation_chunks(world_size) * world_size,
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
    count, see ``orchestrator.train.checkpoint``).
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
