"""Learning-rate schedules: warmup then cosine / linear / constant, exactly as a function of the step."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.train import build_lr_scheduler, lr_multiplier

WARMUP, TOTAL = 10, 110


def _m(step, kind="cosine", min_lr_ratio=0.0):
    return lr_multiplier(step, kind=kind, warmup_steps=WARMUP, total_steps=TOTAL, min_lr_ratio=min_lr_ratio)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant_with_warmup"])
def test_linear_warmup_reaches_the_peak(kind):
    assert _m(0, kind) == pytest.approx(0.1)
    assert _m(4, kind) == pytest.approx(0.5)
    assert _m(WARMUP, kind) == pytest.approx(1.0)


def test_cosine_halfway_and_end():
    assert _m(WARMUP + 50) == pytest.approx(0.5)
    assert _m(TOTAL) == pytest.approx(0.0, abs=1e-12)
    assert _m(TOTAL + 100) == pytest.approx(0.0, abs=1e-12)
    assert _m(WARMUP + 25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_linear_and_constant_shapes_and_floor():
    assert _m(WARMUP + 25, "linear") == pytest.approx(0.75)
    assert _m(TOTAL, "linear", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert _m(TOTAL + 7, "constant_with_warmup") == 1.0
    assert _m(WARMUP + 50, min_lr_ratio=0.2) == pytest.approx(0.2 + 0.8 * 0.5)


def test_no_warmup_starts_at_the_peak():
    assert lr_multiplier(0, kind="cosine", warmup_steps=0, total_steps=10) == pytest.approx(1.0)


def test_unknown_kind_names_the_allowed_ones():
    with pytest.raises(ValueError, match="cosine, linear, constant_with_warmup"):
        lr_multiplier(0, kind="step", warmup_steps=1, total_steps=2)


def test_scheduler_state_round_trip_lands_on_the_same_rate():
    def make():
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
        return optimizer, build_lr_scheduler(optimizer, kind="cosine", warmup_steps=WARMUP, total_steps=TOTAL)

    optimizer, scheduler = make()
    for _ in range(37):
        optimizer.step()
        scheduler.step()
    resumed_optimizer, resumed = make()
    resumed.load_state_dict(scheduler.state_dict())
    resumed_optimizer.param_groups[0]["lr"] = optimizer.param_groups[0]["lr"]
    assert resumed.get_last_lr() == pytest.approx(scheduler.get_last_lr())
    assert scheduler.get_last_lr()[0] == pytest.approx(_m(37))
