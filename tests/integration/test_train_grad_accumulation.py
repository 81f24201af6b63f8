"""Gradient accumulation keeps every negative: 2 real gloo processes x 4 chunks == one big-batch step.

The reference is a single process computing the paper's loss on the whole global batch. Each of two
ranks holds half of that batch, splits it into 4 chunks and runs ``accumulated_step`` with the real
differentiable all-gather; averaging the ranks' gradients (what DeepSpeed's data parallelism does) must
give the reference gradient. The naive loop (one loss per chunk) is checked to differ, so the test can
tell the two apart.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.local_servers import free_port
from models.loss import ClipLoss
from models.registry import create_model
from orchestrator.collectives import all_reduce_sum, gather_with_grad
from orchestrator.train import accumulated_step, single_chunk_step

pytestmark = pytest.mark.integration

WORLD = 2
LOCAL_BATCH = 8
CHUNKS = 4


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(WORLD * LOCAL_BATCH, 3, 32, 32, generator=generator)
    tokens = torch.zeros(WORLD * LOCAL_BATCH, 77, dtype=torch.long)
    lengths = torch.randint(3, 12, (WORLD * LOCAL_BATCH,), generator=generator)
    for row, length in enumerate(lengths.tolist()):
        tokens[row, 0] = 49406
        tokens[row, 1 : length - 1] = torch.randint(300, 5000, (length - 2,), generator=generator)
        tokens[row, length - 1] = 49407
    return images, tokens


def _model():
    torch.manual_seed(0)
    return create_model("ViT-tiny")


def _gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _naive_chunk_loop(model, images, tokens) -> None:
    """The defect this design avoids: each chunk only sees its own (gathered) columns as negatives."""
    for chunk_images, chunk_tokens in zip(images.chunk(CHUNKS), tokens.chunk(CHUNKS)):
        loss = ClipLoss(gather_with_grad)(*model(chunk_images, chunk_tokens)) / CHUNKS
        loss.backward()


def _worker(rank: int, port: int, mode: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model = _model()
    images, tokens = _batch()
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    step_args = dict(loss=ClipLoss(gather_with_grad), backward=lambda loss: loss.backward(), all_reduce=all_reduce_sum)
    if mode == "accumulated":
        result = accumulated_step(model, images[local], tokens[local], chunks=CHUNKS, **step_args)
        assert result.finite
    elif mode == "single":
        assert single_chunk_step(model, images[local], tokens[local], **step_args).finite
    else:
        _naive_chunk_loop(model, images[local], tokens[local])
    grads = _gradients(model)
    for grad in grads.values():  # data-parallel averaging, as DeepSpeed does
        dist.all_reduce(grad)
        grad /= WORLD
    if rank == 0:
        torch.save(grads, os.path.join(out_dir, f"{mode}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_gradients(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    out_dir = tmp_path_factory.mktemp("grads")
    for mode in ("accumulated", "single", "naive"):
        mp.spawn(_worker, args=(free_port(), mode, str(out_dir)), nprocs=WORLD, join=True)
    return {mode: torch.load(out_dir / f"{mode}.pt") for mode in ("accumulated", "single", "naive")}


@pytest.fixture(scope="module")
def big_batch_gradients() -> dict[str, torch.Tensor]:
    model = _model()
    images, tokens = _batch()
    ClipLoss()(*model(images, tokens)).backward()
    return _gradients(model)


def _max_relative_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert grads.keys() == reference.keys()
    return max(float((grads[k] - reference[k]).norm() / (reference[k].norm() + 1e-12)) for k in reference)


def test_accumulated_chunks_across_ranks_equal_the_big_batch_gradient(distributed_gradients, big_batch_gradients):
    assert "logit_scale" in big_batch_gradients and big_batch_gradients["logit_scale"].abs().item() > 0
    assert _max_relative_error(distributed_gradients["accumulated"], big_batch_gradients) < 1e-4


def test_sharded_single_chunk_step_equals_the_big_batch_gradient(distributed_gradients, big_batch_gradients):
    assert _max_relative_error(distributed_gradients["single"], big_batch_gradients) < 1e-4


def test_naive_chunk_loop_differs_from_the_big_batch_gradient(distributed_gradients, big_batch_gradients):
    assert _max_relative_error(distributed_gradients["naive"], big_batch_gradients) > 1e-2
