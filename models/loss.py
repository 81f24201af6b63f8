"""The paper's symmetric contrastive loss, computed shard-wise.

Each rank scores its own N_local rows against the N_global gathered columns, so logits memory is
N_local x N_global instead of N_global^2 (the paper's sharded similarity computation). The matching pair
of local row ``i`` sits at global column ``offset + i``. With ``gather`` the identity this is exactly the
single-process loss; with a distributed all-gather that passes gradients back to their owners, the
mean over ranks of these per-rank losses equals the global-batch loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]
"""tensor (N_local, E) -> (all ranks' tensors concatenated (N_global, E), row offset of this rank's part)."""


def no_gather(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Single-process "gather": the local batch is the global batch."""
    return features, 0


class ClipLoss(nn.Module):
    def __init__(self, gather: Gather | None = None):
        super().__init__()
        self.gather = gather or no_gather

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """Mean of image->text and text->image cross-entropy over this rank's rows (features L2-normalised)."""
        all_image_features, offset = self.gather(image_features)
        all_text_features, text_offset = self.gather(text_features)
        if offset != text_offset:
            raise ValueError(f"gather returned different offsets for images ({offset}) and texts ({text_offset})")
        labels = torch.arange(image_features.shape[0], device=image_features.device) + offset  # (N_local,)
        logits_per_image = logit_scale * image_features @ all_text_features.T  # (N_local, N_global)
        logits_per_text = logit_scale * text_features @ all_image_features.T  # (N_local, N_global)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
