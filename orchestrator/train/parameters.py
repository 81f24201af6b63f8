"""Full parameter values under any ZeRO stage: the one place that reads (and clamps) them, and the export.

Under ZeRO the full fp32 value of a parameter is not where the module's tensor is: ZeRO 1/2 keep the
fp32 master copy in the optimizer's flat partitions (one slice per rank), ZeRO-3 also partitions the
module's own tensors. DeepSpeed's ``safe_get_full_fp32_param`` reassembles a master value (collective),
``GatheredParameters`` makes ZeRO-3 tensors whole for a while (collective). Every function here is
collective: every rank calls it, in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from models import to_openai_layout


def full_fp32_parameters(engine, zero_stage: int, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The full float32 value of the module's parameters (all, or those in ``names``), on the CPU.

    Values come from the optimizer's fp32 master copy where DeepSpeed keeps one, else (frozen parameters,
    no ZeRO) from the parameter itself; ZeRO-3 partitions are gathered first.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    wanted = None if names is None else set(names)
    named = [(n, p) for n, p in engine.module.named_parameters() if wanted is None or n in wanted]
    gathered = [p for _, p in named] if zero_stage == 3 else []
    values = {}
    with deepspeed.zero.GatheredParameters(gathered, modifier_rank=None, enabled=bool(gathered)):
        for name, parameter in named:
            master = safe_get_full_fp32_param(parameter) if parameter.requires_grad else None
            values[name] = (parameter if master is None else master).detach().float().cpu().clone()
    return values


def export_openai_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """The consolidated float32 model in OpenAI's state-dict layout (a bf16 run exports full precision)."""
    parameters = full_fp32_parameters(engine, zero_stage)
    others = {name: value.detach().float().cpu() for name, value in engine.module.state_dict().items()
              if name not in parameters}  # buffers: never partitioned
    return to_openai_layout({**others, **parameters})


def current_logit_scale(engine, zero_stage: int, max_logit_scale: float) -> float:
    """exp(logit scale) as the next forward uses it (clamped like the model clamps it)."""
    value = full_fp32_parameters(engine, zero_stage, ["logit_scale"])["logit_scale"]
    return float(value.exp().clamp(max=max_logit_scale).reshape(()))


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
