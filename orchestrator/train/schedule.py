"""Learning-rate schedules: linear warmup, then cosine (the paper), linear, or constant.

The schedule is a pure function of the optimizer step so that a resumed run lands on exactly the rate
it would have had; :func:`build_lr_scheduler` wraps it in a ``LambdaLR`` whose state DeepSpeed saves
and restores with the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SCHEDULE_KINDS = ("cosine", "linear", "constant_with_warmup")


def lr_multiplier(
    step: int, *, kind: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """Fraction of the peak learning rate to use for optimizer step ``step`` (0-based).

    Warmup rises linearly to 1 over ``warmup_steps`` (step 0 already gets 1/warmup, never a wasted zero
    step); afterwards ``cosine`` and ``linear`` decay to ``min_lr_ratio`` at ``total_steps`` and stay
    there, ``constant_with_warmup`` stays at 1.
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"schedule kind {kind!r} unknown; allowed: {', '.join(SCHEDULE_KINDS)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant_with_warmup":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, *, kind: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_multiplier` of the optimizer's base learning rates."""
    multiplier: Callable[[int], float] = lambda step: lr_multiplier(  # noqa: E731
        step, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
