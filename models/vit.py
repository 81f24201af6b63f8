"""The paper's Vision Transformer image tower.

Follows Dosovitskiy et al. except for the one change the CLIP paper names: an extra LayerNorm (``ln_pre``)
on the combined patch + position embeddings before the Transformer. The class token's output goes through
``ln_post`` and a bias-free projection ``proj`` into the joint embedding space.
"""

from __future__ import annotations

import torch
from torch import nn

from models.transformer import Transformer


class VisionTransformer(nn.Module):
    def __init__(
        self, *, image_size: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int, quick_gelu: bool
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        grid = image_size // patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu=quick_gelu, causal=False)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images)  # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, g*g+1, D)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (B, E)

    def init_weights(self) -> None:
        self.transformer.init_weights()
