"""ClipLoss: the paper's symmetric loss, and its sharded form across two real gloo processes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from harness.local_servers import free_port
from models import create_model
from models.loss import ClipLoss
from orchestrator.collectives import gather_with_grad

GLOBAL_BATCH = 8
WORLD_SIZE = 2


def reference_loss(image_features, text_features, scale):
    """The paper's pseudocode: full N x N logits, labels on the diagonal."""
    logits = scale * image_features @ text_features.T
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_single_process_loss_matches_the_papers_pseudocode():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(6, 16), dim=-1)
    texts = F.normalize(torch.randn(6, 16), dim=-1)
    scale = torch.tensor(14.3)
    torch.testing.assert_close(ClipLoss()(images, texts, scale), reference_loss(images, texts, scale))
    perfect = ClipLoss()(images, images, torch.tensor(100.0))
    assert perfect.item() < 1e-3  # matching pairs at the maximum temperature: near-zero loss


def test_local_rows_use_the_offset_labels():
    """Each rank scores its rows against all columns; the ranks' mean is the global loss."""
    torch.manual_seed(0)
    images = F.normalize(torch.randn(8, 16), dim=-1)
    texts = F.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(10.0)

    def fake_gather_for(rank, offset=None):
        def gather(local):
            full = images if torch.equal(local, images[4 * rank : 4 * rank + 4]) else texts
            return full, 4 * rank if offset is None else offset

        return gather

    halves = [
        ClipLoss(gather=fake_gather_for(rank))(images[4 * rank : 4 * rank + 4], texts[4 * rank : 4 * rank + 4], scale)
        for rank in range(2)
    ]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, reference_loss(images, texts, scale))
    wrong_offset = ClipLoss(gather=fake_gather_for(1, offset=0))
    assert not torch.allclose(wrong_offset(images[4:], texts[4:], scale), halves[1])


def _batch():
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator)
    tokens = torch.zeros(GLOBAL_BATCH, 77, dtype=torch.long)
    tokens[:, 0] = 49406
    tokens[:, 1:6] = torch.randint(1, 40000, (GLOBAL_BATCH, 5), generator=generator)
    tokens[:, 6] = 49407
    return images, tokens


def _gradients_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _sharded_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.manual_seed(0)
        model = create_model("ViT-tiny")
        images, tokens = _batch()
        local = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
        loss = ClipLoss(gather=gather_with_grad)(*model(images[local], tokens[local]))
        grads = _gradients_of(model, loss)
        for grad in grads.values():  # what DeepSpeed/DDP do: average gradients over ranks
            dist.all_reduce(grad)
            grad /= WORLD_SIZE
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        torch.save({"loss": mean_loss / WORLD_SIZE, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_reproduce_the_global_batch_loss_and_gradients(tmp_path):
    mp.spawn(_sharded_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    torch.manual_seed(0)
    model = create_model("ViT-tiny")
    images, tokens = _batch()
    global_loss = ClipLoss()(*model(images, tokens))
    global_grads = _gradients_of(model, global_loss)
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], global_loss.detach(), rtol=1e-5, atol=1e-6)
        assert result["grads"].keys() == global_grads.keys()
        for name, grad in global_grads.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("offsets", [(0, 4)])
def test_mismatched_gather_offsets_are_rejected(offsets):
    calls = iter(offsets)
    loss = ClipLoss(gather=lambda t: (t, next(calls)))
    features = F.normalize(torch.randn(4, 8), dim=-1)
    with pytest.raises(ValueError, match="different offsets"):
        loss(features, features, torch.tensor(1.0))
