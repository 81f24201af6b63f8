"""The paper's symmetric contrastive loss and SigLIP's sigmoid loss, both computed shard-wise.

Each rank scores its own N_local rows against the N_global columns, so logits memory is N_local x N_global
instead of N_global^2 (the paper's sharded similarity computation). Neither loss knows about processes:
:class:`ClipLoss` takes a ``gather`` and :class:`SigLipLoss` a ``text_blocks`` exchange, and
``orchestrator/`` passes the distributed ones in.

Both return the mean over this rank's rows, so with equal shares the mean over ranks (what data-parallel
gradient averaging optimises) is the global-batch loss; unequal shares are weighted by the caller
(``orchestrator.train.step``'s ``loss_weight``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]
"""tensor (N_local, E) -> (all ranks' tensors concatenated (N_global, E), row offset of this rank's part)."""

TextBlocks = Callable[[torch.Tensor], Iterable[torch.Tensor]]
"""texts (N_local, E) -> every rank's texts once each, one (N_r, E) block at a time, this rank's own first.
Blocks must carry gradient back to the rank that owns them."""


def no_gather(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Single-process "gather": the local batch is the global batch."""
    return features, 0


def own_texts_only(texts: torch.Tensor) -> Iterable[torch.Tensor]:
    """Single-process text exchange: the local texts are all the texts."""
    return (texts,)


class ClipLoss(nn.Module):
    def __init__(self, gather: Gather | None = None):
        super().__init__()
        self.gather = gather or no_gather

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """Mean of image->text and text->image cross-entropy over this rank's rows (features L2-normalised).

        The matching pair of local row ``i`` sits at global column ``offset + i``.
        """
        all_image_features, offset = self.gather(image_features)
        all_text_features, text_offset = self.gather(text_features)
        if offset != text_offset:
            raise ValueError(f"gather returned different offsets for images ({offset}) and texts ({text_offset})")
        labels = torch.arange(image_features.shape[0], device=image_features.device) + offset  # (N_local,)
        logits_per_image = logit_scale * image_features @ all_text_features.T  # (N_local, N_global)
        logits_per_text = logit_scale * text_features @ all_image_features.T  # (N_local, N_global)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """The sigmoid loss of Zhai et al. 2023 ("Sigmoid Loss for Language Image Pre-Training").

    Every image-text pair is an independent binary problem: logit z = scale * <image, text> + bias, label +1
    for a matching pair and -1 otherwise, loss = -log sigmoid(label * z), summed over all texts of the global
    batch and averaged over images (the paper's 1/|B| normalisation). Nothing is normalised over a row, so
    the texts can be visited one block at a time and no N x N_global matrix of softmax needs to exist:
    ``text_blocks`` hands over every rank's texts in turn (a ring exchange in ``orchestrator``), and memory
    for logits is N_local x N_r per block.

    Since -log sigmoid(-z) = softplus(z) and log sigmoid(z) - log sigmoid(-z) = z, a block's loss is
    sum(softplus(z)) over all its pairs, minus the sum of z over the matching pairs (the diagonal of the
    rank's own block, which ``text_blocks`` yields first): no label matrix is built.
    """

    def __init__(self, text_blocks: TextBlocks | None = None):
        super().__init__()
        self.text_blocks = text_blocks or own_texts_only

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
    ) -> torch.Tensor:
        """This rank's images' loss against every text, divided by this rank's image count (features L2-normalised)."""
        if image_features.shape[0] != text_features.shape[0]:
            raise ValueError(f"{image_features.shape[0]} images but {text_features.shape[0]} texts: pairs must match")
        total = image_features.new_zeros(())
        for index, texts in enumerate(self.text_blocks(text_features)):
            logits = logit_scale * image_features @ texts.T + logit_bias  # (N_local, N_r)
            total = total + F.softplus(logits).sum()
            if index == 0:  # this rank's own texts: the matching pairs are on the diagonal
                total = total - logits.diagonal().sum()
        return total / image_features.shape[0]
