"""A NaN/inf loss skips the step on every rank without touching gradients, and too many in a row abort."""

from __future__ import annotations

import pytest
import torch

from models.registry import create_model
from models import ClipLoss
from orchestrator.train import TrainState
from orchestrator.collectives import all_reduce_sum, gather_with_grad
from orchestrator.config import load_config
from orchestrator.train import accumulated_step, single_chunk_step
from orchestrator.train import NonFiniteLossError, StepResult, Worker, count_nonfinite



def _batch(poison: bool):
    images = torch.randn(4, 3, 32, 32)
    if poison:
        images[0, 0, 0, 0] = float("nan")
    tokens = torch.zeros(4, 77, dtype=torch.long)
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = 49406, 320, 49407
    return images, tokens


@pytest.mark.parametrize("chunks", [1, 2])
def test_nonfinite_loss_is_not_backpropagated(chunks):
    model = create_model("ViT-tiny")
    calls = []
    args = dict(loss=ClipLoss(gather_with_grad), backward=lambda loss: calls.append(loss.backward()), all_reduce=all_reduce_sum)
    step = single_chunk_step if chunks == 1 else lambda *a, **k: accumulated_step(*a, chunks=chunks, **k)
    poisoned = step(model, *_batch(poison=True), **args)
    assert not poisoned.finite and not calls
    assert all(p.grad is None for p in model.parameters())
    assert step(model, *_batch(poison=False), **args).finite and len(calls) == chunks


def test_consecutive_nonfinite_steps_abort_with_advice():
    cfg = load_config(overrides=["loss.max_nonfinite_in_row=3"])
    worker = Worker(cfg, rank=0, world_size=1, engine=None, state=TrainState(step=7))
    bad = StepResult(torch.tensor(float("nan")), False)
    count_nonfinite(worker, bad)
    count_nonfinite(worker, bad)
    with pytest.raises(NonFiniteLossError, match="loss.max_nonfinite_in_row=3.*optim.lr"):
        count_nonfinite(worker, bad)
    assert worker.state.nonfinite_steps == 3
