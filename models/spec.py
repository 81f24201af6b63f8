"""Declarative architecture specs: every behaviour-changing choice of a CLIP model is a field here.

A spec is saved with every checkpoint (``ModelSpec.to_dict``) so a model can be rebuilt exactly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class VisionSpec:
    kind: Literal["resnet", "vit"]
    """Which image tower: the paper's ModifiedResNet or its Vision Transformer."""
    image_size: int
    """Input resolution in pixels (square)."""
    width: int
    """ResNet: channels after the stem (stage widths are 1, 2, 4, 8 x this, times 4 in the bottleneck output).
    ViT: the Transformer width."""
    layers: tuple[int, ...] | int
    """ResNet: blocks per stage (four numbers). ViT: Transformer depth."""
    heads: int
    """Attention heads: of the attention pool (ResNet) or of every Transformer layer (ViT)."""
    patch_size: int | None = None
    """ViT only: side of the square patches."""


@dataclass(frozen=True, kw_only=True)
class TextSpec:
    width: int
    layers: int
    heads: int
    context_length: int = 77
    """Tokens per caption, [SOS] and [EOS] included."""
    vocab_size: int = 49408
    """256 bytes + 256 bytes with end-of-word + 48,894 merges + [SOS] + [EOS]."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str
    embed_dim: int
    """Dimension of the joint image-text embedding space."""
    vision: VisionSpec
    text: TextSpec
    quick_gelu: bool = True
    """OpenAI trained with QuickGELU; their weights are only exact with it."""
    init_logit_scale: float = 2.6592600369453430  # log(1 / 0.07), the paper's initial temperature
    max_logit_scale: float = 100.0
    """exp(logit_scale) is clamped here, as in the paper."""
    init_logit_bias: float | None = None
    """SigLIP's learnable logit bias, initialised here (``logit_bias`` parameter); None (CLIP's softmax loss,
    OpenAI's layout) means the model has no bias. See :func:`siglip_spec`."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        vision = dict(data["vision"])
        if isinstance(vision["layers"], list):
            vision["layers"] = tuple(vision["layers"])
        return cls(
            **{k: v for k, v in data.items() if k not in ("vision", "text")},
            vision=VisionSpec(**vision),
            text=TextSpec(**data["text"]),
        )

    def __post_init__(self) -> None:
        vision = self.vision
        if vision.kind not in ("resnet", "vit"):
            raise ValueError(f"{self.name}: vision.kind must be 'resnet' or 'vit', got {vision.kind!r}")
        if vision.kind == "resnet" and (not isinstance(vision.layers, tuple) or len(vision.layers) != 4):
            raise ValueError(f"{self.name}: a resnet tower needs vision.layers as four stage depths, got {vision.layers!r}")
        if vision.kind == "resnet" and vision.image_size % 32:
            raise ValueError(f"{self.name}: a resnet tower needs image_size divisible by 32, got {vision.image_size}")
        if vision.kind == "vit" and (vision.patch_size is None or not isinstance(vision.layers, int)):
            raise ValueError(f"{self.name}: a vit tower needs vision.patch_size and an integer vision.layers")


SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
"""SigLIP's initial log-scale (Zhai et al. 2023): exp(t') = 10, where CLIP starts at 1 / 0.07."""
SIGLIP_INIT_LOGIT_BIAS = -10.0
"""SigLIP's initial bias: each image has one positive among N - 1 negatives, so logits that start near -10
start the loss near its prior instead of spending the first steps pushing every negative down."""


def siglip_spec(spec: ModelSpec) -> ModelSpec:
    """``spec`` for the sigmoid loss: a learnable ``logit_bias`` and the SigLIP paper's initial scale and bias.

    No other weight changes: OpenAI-layout weights load into it (``CLIP.load_openai_state_dict`` keeps the
    initial bias when they carry none).
    """
    return dataclasses.replace(spec, init_logit_scale=SIGLIP_INIT_LOGIT_SCALE, init_logit_bias=SIGLIP_INIT_LOGIT_BIAS)
