"""The ring exchange of text features that makes SigLIP's loss distributed without an N_global^2 matrix.

The sigmoid loss sums over image-text pairs independently, so a rank can score its images against the
texts of the other ranks one block at a time: pass every rank's text block one step around the ring
(rank r sends to r + 1 and receives from r - 1), W - 1 times, scoring the local images against each block
as it arrives. Each rank holds N_local x N_r logits per block, never N_global x N_global, and text blocks
are all that moves (the images stay home).

Gradients are exact by construction: one hop is an autograd function whose backward is the same hop in
the opposite direction. A block that travelled k hops to reach rank r got there through the copies on
ranks r - 1, ..., r - k; backward sends rank r's gradient for it back one hop, where autograd adds it to
the gradient that rank's own loss produced for the same block before sending the sum on, and so on until
it reaches the owner. The owner's text features thus receive the sum over all ranks of each rank's loss
gradient, which is what data-parallel averaging of these per-rank losses needs (the same sum
``gather_with_grad`` forms by all-reduce, here without moving N_global rows in either direction).
Sends and receives are posted together (``batch_isend_irecv``), which gloo and NCCL both accept and which
cannot deadlock however large the block.

Loss convention (as :class:`models.ClipLoss`): each rank's :class:`models.SigLipLoss` is the sum over its
images of the loss against all N_global texts, divided by its own N_local; with equal shares the mean over
ranks is the single-process loss on the global batch, and unequal shares take the same ``loss_weight``
(world size x N_local / N_global) the CLIP step already applies.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist


def _swap(send: torch.Tensor, destination: int, receive: torch.Tensor, source: int) -> None:
    """Send ``send`` to ``destination`` while receiving ``receive`` from ``source`` (both posted, then waited)."""
    operations = [dist.P2POp(dist.isend, send, destination), dist.P2POp(dist.irecv, receive, source)]
    for request in dist.batch_isend_irecv(operations):
        request.wait()


class _PassToNextRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block: torch.Tensor, incoming_rows: int) -> torch.Tensor:
        rank, world = dist.get_rank(), dist.get_world_size()
        ctx.sent_rows = block.shape[0]
        received = block.new_empty((incoming_rows, *block.shape[1:]))  # (N_{r-1's block}, E)
        _swap(block.contiguous(), (rank + 1) % world, received, (rank - 1) % world)
        return received

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        rank, world = dist.get_rank(), dist.get_world_size()
        returned = grad_output.new_empty((ctx.sent_rows, *grad_output.shape[1:]))  # (N_sent, E)
        _swap(grad_output.contiguous(), (rank - 1) % world, returned, (rank + 1) % world)
        return returned, None


def ring_text_blocks(texts: torch.Tensor) -> Iterator[torch.Tensor]:
    """Every rank's ``(N_r, E)`` texts in turn, this rank's own first, differentiably (see the module docstring).

    The :data:`models.TextBlocks` exchange for :class:`models.SigLipLoss`. Every rank must consume all the
    blocks (each one is a collective hop). Ranks may hold different row counts; they are exchanged first.
    Without a process group (or with one rank) it yields ``texts`` alone.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        yield texts
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    counts = [texts.new_zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(counts, texts.new_tensor([texts.shape[0]], dtype=torch.long))
    rows = [int(count) for count in counts]
    block = texts
    yield block
    for hop in range(1, world):
        block = _PassToNextRank.apply(block, rows[(rank - hop) % world])  # rank (r - hop)'s texts
        yield block
