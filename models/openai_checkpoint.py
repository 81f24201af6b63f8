"""Reading OpenAI's released CLIP checkpoints: infer the architecture from the weights, then load strictly.

OpenAI's files are TorchScript archives (or plain state dicts); neither names its architecture, so the
spec is read off parameter shapes the way their ``build_model`` does, then matched to a registered name.
Head counts leave no trace in the shapes, so OpenAI's loader and open_clip's assume one head per 64 channels
(ResNet attention pool: width * 32 / 64). Every registered architecture, the debug sizes included, follows
that rule, so its exports load exactly there too; an unregistered one is given the rule here as well.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping

import torch

from models.clip import CLIP
from models.registry import get_model_spec, list_models
from models.spec import ModelSpec, TextSpec, VisionSpec, siglip_spec


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({key.split(".")[len(prefix.split("."))] for key in state if key.startswith(prefix + ".")})


def spec_from_openai_state_dict(state: Mapping[str, torch.Tensor]) -> ModelSpec:
    """The :class:`ModelSpec` whose parameter shapes produce ``state`` (a registered one where it matches);
    a ``logit_bias`` entry (a SigLIP-trained export) makes it the :func:`siglip_spec` of that."""
    spec = _architecture_from_shapes(state)
    return siglip_spec(spec) if "logit_bias" in state else spec


def _architecture_from_shapes(state: Mapping[str, torch.Tensor]) -> ModelSpec:
    embed_dim = state["text_projection"].shape[1]
    text_width = state["ln_final.weight"].shape[0]
    text = TextSpec(
        width=text_width,
        layers=_count_blocks(state, "transformer.resblocks"),
        heads=text_width // 64,
        context_length=state["positional_embedding"].shape[0],
        vocab_size=state["token_embedding.weight"].shape[0],
    )
    if "visual.proj" in state:
        width = state["visual.conv1.weight"].shape[0]
        patch = state["visual.conv1.weight"].shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionSpec(
            kind="vit",
            image_size=patch * grid,
            width=width,
            layers=_count_blocks(state, "visual.transformer.resblocks"),
            heads=width // 64,
            patch_size=patch,
        )
    else:
        width = state["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = tuple(_count_blocks(state, f"visual.layer{i}") for i in range(1, 5))
        vision = VisionSpec(kind="resnet", image_size=grid * 32, width=width, layers=layers, heads=width * 32 // 64)
    inferred = ModelSpec(name="custom", embed_dim=embed_dim, vision=vision, text=text)
    for name in list_models():
        registered = get_model_spec(name)
        if _same_shapes(registered, inferred):
            return registered  # with its name and the fields no weight shape reveals
    return inferred


def _same_shapes(registered: ModelSpec, inferred: ModelSpec) -> bool:
    """Equal up to the name and the attention head counts (inferred as OpenAI's width / 64)."""
    vision = dataclasses.replace(registered.vision, heads=inferred.vision.heads)
    text = dataclasses.replace(registered.text, heads=inferred.text.heads)
    candidate = dataclasses.replace(registered, name=inferred.name, vision=vision, text=text)
    return candidate == inferred


def load_openai_checkpoint(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> CLIP:
    """A :class:`CLIP` holding the weights of an OpenAI checkpoint (TorchScript file, state-dict file or dict)."""
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        try:
            with warnings.catch_warnings():  # OpenAI's releases are TorchScript archives: jit.load is how they open
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated")
                state = torch.jit.load(source, map_location="cpu").state_dict()
        except RuntimeError:
            state = torch.load(source, map_location="cpu", weights_only=True)
    state = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
    model = CLIP(spec_from_openai_state_dict(state))
    model.load_openai_state_dict(state)
    return model
