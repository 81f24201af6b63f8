"""The paper's Vision Transformer image tower, with FLIP's patch dropout as a training-only option.

Follows Dosovitskiy et al. except for the one change the CLIP paper names: an extra LayerNorm (``ln_pre``)
on the combined patch + position embeddings before the Transformer. The class token's output goes through
``ln_post`` and a bias-free projection ``proj`` into the joint embedding space.

Patch dropout (Li et al. 2023, "Scaling Language-Image Pre-training via Masking", FLIP) is not in the CLIP
paper: while training, each image keeps a random subset of its patch tokens, so every Transformer layer
runs on fewer tokens (attention cost falls quadratically, the MLP linearly). It is a training recipe, not
architecture: no weight depends on it, so it is a runtime attribute rather than a ``VisionSpec`` field and
exports are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from models.transformer import Transformer


def check_patch_dropout(fraction: float) -> float:
    """``fraction`` if it is a valid share of patch tokens to drop (0 <= p < 1), else a ValueError."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"patch_dropout must be in [0, 1), got {fraction}")
    return float(fraction)


def kept_patch_count(patches: int, fraction: float) -> int:
    """Patch tokens an image keeps in training under patch dropout ``fraction``: round((1 - p) * patches), at
    least one (all of them at 0)."""
    return max(1, round((1.0 - fraction) * patches))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        quick_gelu: bool,
        patch_dropout: float = 0.0,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.patch_dropout = check_patch_dropout(patch_dropout)  # a plain attribute: changed at run time
        grid = image_size // patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu=quick_gelu, causal=False)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def kept_patches(self, patches: int) -> int:
        """Patch tokens each image keeps in training mode (:func:`kept_patch_count`)."""
        return kept_patch_count(patches, self.patch_dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images)  # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, g*g+1, D)
        if self.training and self.patch_dropout > 0.0:
            x = self._drop_patches(x)  # (B, 1+kept, D)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (B, E)

    def _drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Keep the class token and an independent uniform random subset of each image's patch tokens.

        Dropping happens after the positional embedding is added, so a kept token still knows where it came
        from and the Transformer (no mask, permutation-equivariant) needs no index bookkeeping. ``ln_pre`` is
        per token, so dropping before it is exact and saves its work. Random draws use torch's global
        generator, which the caller seeds.
        """
        batch, tokens, width = x.shape
        keep = self.kept_patches(tokens - 1)
        chosen = torch.rand(batch, tokens - 1, device=x.device).argsort(dim=1)[:, :keep]  # (B, keep)
        patches = x[:, 1:].gather(1, chosen.unsqueeze(-1).expand(-1, -1, width))  # (B, keep, D)
        return torch.cat([x[:, :1], patches], dim=1)  # (B, 1+keep, D)

    def init_weights(self) -> None:
        self.transformer.init_weights()
