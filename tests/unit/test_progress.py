"""The ETA a training run prints: the steps left at the training pace, plus the pauses (evaluations,
checkpoints) spread over the steps as they came so far; a pause does not make the ETA jump."""

from __future__ import annotations

import pytest

from orchestrator.train.worker_tracking import Pace


def test_without_pauses_the_eta_is_the_steps_left_at_the_training_pace():
    assert Pace(first_step=0).eta_s(100, 600, step_s=0.3) == pytest.approx(150.0)


def test_a_pause_is_spread_over_the_steps_instead_of_slowing_the_rate():
    # the demo's step 210: 0.3 s a step, one 7.5 s evaluation + checkpoint at step 200
    pace = Pace(first_step=0)
    assert pace.paused(7.5) == 7.5
    eta = pace.eta_s(210, 600, step_s=0.3)
    assert eta == pytest.approx(390 * (0.3 + 7.5 / 210))
    assert 120 < eta < 140  # the old ETA, from the window's rate with the pause inside, said 6 min 47 s


def test_a_resumed_attempt_counts_its_own_steps():
    pace = Pace(first_step=400)
    pace.paused(10.0)
    assert pace.eta_s(410, 600, step_s=0.5) == pytest.approx(190 * (0.5 + 10.0 / 10))
