"""One declarative entry per architecture, named as the paper names it (``list_models``, ``create_model``).

The image tower is chosen by the explicit ``VisionSpec.kind`` field, never inferred from other fields.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from models.spec import ModelSpec, TextSpec, VisionSpec

if TYPE_CHECKING:
    from models.clip import CLIP


def _resnet(name, embed_dim, image_size, layers, width, text_width, text_heads) -> ModelSpec:
    # OpenAI: the attention pool has one head per 64 channels of the (width * 32)-dim ResNet feature.
    vision = VisionSpec(kind="resnet", image_size=image_size, width=width, layers=layers, heads=width * 32 // 64)
    return ModelSpec(
        name=name, embed_dim=embed_dim, vision=vision, text=TextSpec(width=text_width, layers=12, heads=text_heads)
    )


def _vit(name, embed_dim, image_size, patch, width, layers, text_width, text_heads) -> ModelSpec:
    vision = VisionSpec(kind="vit", image_size=image_size, width=width, layers=layers, heads=width // 64, patch_size=patch)
    return ModelSpec(
        name=name, embed_dim=embed_dim, vision=vision, text=TextSpec(width=text_width, layers=12, heads=text_heads)
    )


_ARCHITECTURES: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        _resnet("RN50", 1024, 224, (3, 4, 6, 3), 64, 512, 8),
        _resnet("RN101", 512, 224, (3, 4, 23, 3), 64, 512, 8),
        _resnet("RN50x4", 640, 288, (4, 6, 10, 6), 80, 640, 10),
        _resnet("RN50x16", 768, 384, (6, 8, 18, 8), 96, 768, 12),
        _resnet("RN50x64", 1024, 448, (3, 15, 36, 10), 128, 1024, 16),
        _vit("ViT-B/32", 512, 224, 32, 768, 12, 512, 8),
        _vit("ViT-B/16", 512, 224, 16, 768, 12, 512, 8),
        _vit("ViT-L/14", 768, 224, 14, 1024, 24, 768, 12),
        _vit("ViT-L/14@336px", 768, 336, 14, 1024, 24, 768, 12),
        # Debug sizes for CPU tests and the laptop demo: same code paths, a few hundred thousand
        # parameters outside the 49,408-row token embedding. Heads are width / 64 (ResNet pool: width * 32 / 64)
        # because OpenAI's build_model and open_clip infer them that way from the weights of an export.
        ModelSpec(
            name="RN-tiny",
            embed_dim=64,
            vision=VisionSpec(kind="resnet", image_size=64, width=16, layers=(1, 1, 1, 1), heads=8),
            text=TextSpec(width=64, layers=2, heads=1),
        ),
        ModelSpec(
            name="ViT-tiny",
            embed_dim=64,
            vision=VisionSpec(kind="vit", image_size=32, width=64, layers=2, heads=1, patch_size=4),
            text=TextSpec(width=64, layers=2, heads=1),
        ),
    ]
}

PAPER_MODELS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px")


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`: the nine paper architectures, then the debug sizes."""
    return list(_ARCHITECTURES)


def get_model_spec(
    name: str,
    *,
    image_size: int | None = None,
    context_length: int | None = None,
    quick_gelu: bool | None = None,
) -> ModelSpec:
    """The spec registered under ``name``, with optional overrides of resolution, context and activation."""
    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(_ARCHITECTURES)}")
    spec = _ARCHITECTURES[name]
    if image_size is not None:
        spec = dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, image_size=image_size))
    if context_length is not None:
        spec = dataclasses.replace(spec, text=dataclasses.replace(spec.text, context_length=context_length))
    if quick_gelu is not None:
        spec = dataclasses.replace(spec, quick_gelu=quick_gelu)
    return spec


def create_model(
    name: str,
    *,
    image_size: int | None = None,
    context_length: int | None = None,
    quick_gelu: bool | None = None,
) -> CLIP:
    """Build a randomly initialised CLIP of a registered architecture (OpenAI's initialisation)."""
    from models.clip import CLIP  # torch, imported only where a model is built

    return CLIP(get_model_spec(name, image_size=image_size, context_length=context_length, quick_gelu=quick_gelu))


__all__ = ["ModelSpec", "VisionSpec", "TextSpec", "PAPER_MODELS", "list_models", "get_model_spec", "create_model"]
