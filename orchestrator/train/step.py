"""One contrastive optimisation step's forward/backward, with gradient accumulation that keeps every negative.

The naive accumulation loop (loss per micro-batch, backward, repeat) shrinks each softmax to the
micro-batch's columns and so changes the objective. Here an accumulated step is exact:

1. forward every chunk without gradient and keep its features (cheap: no activations stored);
2. compute the loss of the whole accumulated batch (gathered across ranks) on those cached features,
   and its gradient with respect to the features and the logit scale only;
3. per chunk, recompute the features with gradient and back-propagate the cached feature gradient
   through them (``sum(features * cached_grad)`` has exactly that gradient).

This is the loss "against the cached features of the others" with each chunk's slice live in turn,
evaluated once instead of once per chunk; the summed parameter gradient equals the large-batch one.
Nothing here knows about DeepSpeed: ``backward`` is passed in (``engine.backward`` in training, plain
autograd in the tests).

Ranks may hold different numbers of rows (a global batch that does not divide by the worker count).
Data parallelism averages the ranks' gradients, which is the global mean only if each rank's loss counts
its rows: ``loss_weight`` = world size x local rows / global rows scales this rank's mean (exactly 1 when
the rows are equal), so the average over ranks is the mean over every row of the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models import ClipLoss, SigLipLoss
from orchestrator.collectives import gather_with_grad
from orchestrator.siglip_exchange import ring_text_blocks


Backward = Callable[[torch.Tensor], None]
LossFunction = Callable[..., torch.Tensor]
"""(image features, text features, logit scale[, logit bias]) -> this rank's loss: ``models.ClipLoss`` with the
distributed gather, or ``models.SigLipLoss`` with the ring exchange (see :func:`contrastive_loss`)."""


@dataclass(frozen=True)
class StepResult:
    loss: torch.Tensor
    """This rank's loss (detached)."""
    finite: bool
    """False when some rank's loss was NaN/inf; then nothing was back-propagated anywhere."""


def _features(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Model forward in float32, so the loss never runs in bf16: (image features, text features, then the
    loss's learnable scalars: the logit scale, and SigLIP's bias for a model that has one)."""
    return tuple(output.float() for output in model(images, tokens))


def contrastive_loss(kind: str) -> nn.Module:
    """The run's loss across ranks: ``clip`` (features all-gathered with gradient) or ``siglip`` (text blocks
    passed around the ring); either is the single-process loss without a process group."""
    if kind == "siglip":
        return SigLipLoss(ring_text_blocks)
    return ClipLoss(gather_with_grad)


def _all_finite(loss: torch.Tensor, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """True when the loss is finite on every rank, so all ranks skip or step together."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    return float(all_reduce(bad)) == 0.0


def single_chunk_step(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    *,
    loss: LossFunction,
    backward: Backward,
    all_reduce: Callable[[torch.Tensor], torch.Tensor],
    loss_weight: float = 1.0,
) -> StepResult:
    """Forward, gathered loss, backward: the plain step when the local batch fits in one chunk."""
    value = loss(*_features(model, images, tokens)) * loss_weight
    if not _all_finite(value, all_reduce):
        return StepResult(value.detach(), False)
    backward(value)
    return StepResult(value.detach(), True)


def accumulated_step(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    *,
    chunks: int,
    loss: LossFunction,
    backward: Backward,
    all_reduce: Callable[[torch.Tensor], torch.Tensor],
    loss_weight: float = 1.0,
) -> StepResult:
    """The exact large-batch gradient from ``chunks`` forward/backward passes (see module docstring).

    ``backward`` is called exactly ``chunks`` times (every rank the same, as DeepSpeed counts them, whatever
    its rows); the caller steps the optimizer after the last one.
    """
    if images.shape[0] < chunks:
        raise ValueError(f"{images.shape[0]} rows cannot fill {chunks} chunks")
    image_chunks, token_chunks = images.tensor_split(chunks), tokens.tensor_split(chunks)
    with torch.no_grad():
        cached = [_features(model, i, t) for i, t in zip(image_chunks, token_chunks)]
    image_features = torch.cat([c[0] for c in cached]).requires_grad_()  # (N_local, E)
    text_features = torch.cat([c[1] for c in cached]).requires_grad_()  # (N_local, E)
    scalars = [value.detach().requires_grad_() for value in cached[0][2:]]  # logit scale (and SigLIP's bias)
    value = loss(image_features, text_features, *scalars) * loss_weight
    if not _all_finite(value, all_reduce):
        return StepResult(value.detach(), False)
    image_grad, text_grad, *scalar_grads = torch.autograd.grad(value, [image_features, text_features, *scalars])
    sizes = [len(i) for i in image_chunks]
    for index, (chunk_images, chunk_tokens, g_image, g_text) in enumerate(
        zip(image_chunks, token_chunks, image_grad.split(sizes), text_grad.split(sizes))
    ):
        live_image, live_text, *live_scalars = _features(model, chunk_images, chunk_tokens)
        surrogate = (live_image * g_image).sum() + (live_text * g_text).sum()
        if index == 0:  # the scalars are shared by all chunks: their gradient enters once
            surrogate = surrogate + sum((live * grad).sum() for live, grad in zip(live_scalars, scalar_grads))
        backward(surrogate)
    return StepResult(value.detach(), True)
