"""All-gather that keeps gradients, for the contrastive loss's local-rows x global-columns logits.

``torch.distributed.all_gather`` returns tensors detached from autograd, so without this every rank's
loss would only train its own features. Each rank's features appear as columns in every other rank's
logits, so the gradient reaching rank r's features is the sum over all ranks of the gradient with respect
to rank r's slice of the gathered tensor. The usual backward is a reduce-scatter; gloo (the CPU backend)
has none, so the backward here all-reduces the full gradient and keeps the local slice, which is the same
sum at the price of moving the whole tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
        rank = dist.get_rank()
        ctx.start, ctx.rows = sum(rows[:rank]), rows[rank]
        longest = max(rows)  # all_gather moves equal shapes: shorter parts travel padded, then are cut back
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, rows)], dim=0)  # (sum(rows), ...)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.rows], None


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's ``(N_local, ...)`` tensor along dim 0 in rank order, differentiably.

    Returns ``(global_tensor, offset)`` where ``offset`` is the row of this rank's first element in the
    global tensor. Ranks may pass different ``N_local`` (a global batch that does not divide by the
    worker count); the counts are exchanged first. Without an initialised process group (or with one
    rank) the tensor is returned as is.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor, 0
    counts = [tensor.new_zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, tensor.new_tensor([tensor.shape[0]], dtype=torch.long))
    rows = [int(count) for count in counts]
    return _AllGatherWithGrad.apply(tensor.contiguous(), rows), sum(rows[: dist.get_rank()])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op without a process group); returns it. A CPU tensor (a flag, a count)
    goes through this rank's GPU where the process group is NCCL's alone, which reduces device tensors only."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
            staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(staged, op=dist.ReduceOp.SUM)
            tensor.copy_(staged)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(value):
    """Every rank's picklable ``value``, in rank order (``[value]`` without a process group)."""
    if not dist.is_available() or not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def gather_objects_to_chief(value):
    """Every rank's picklable ``value`` in rank order on rank 0, None on the others (``[value]`` alone)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_from_chief(value):
    """Rank 0's picklable ``value`` on every rank (``value`` itself without a process group)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
