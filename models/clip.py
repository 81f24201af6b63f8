"""CLIP: an image tower and a text tower projected into one L2-normalised embedding space.

``forward`` returns features and the temperature, not logits: the loss builds local-rows x global-columns
logits from gathered features (see ``models.loss``), which is what sharded training needs. Parameter names
and shapes are those of OpenAI's released checkpoints, with one storage difference handled here alone:
``logit_scale`` is kept as a 1-element vector (DeepSpeed ZeRO-3 rejects 0-dim parameters) and converted
to and from OpenAI's 0-dim scalar on load and export.

A model built from a :func:`models.spec.siglip_spec` has one parameter OpenAI's layout lacks, SigLIP's
``logit_bias`` (stored and exported like ``logit_scale``); ``forward`` then returns it too, so the loss gets
it from inside the forward, where ZeRO-3 has the parameter gathered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from models.resnet import ModifiedResNet
from models.spec import ModelSpec
from models.transformer import Transformer
from models.vit import VisionTransformer, check_patch_dropout

# Non-tensor entries OpenAI's JIT checkpoints carry beside the weights.
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
# 0-dim in exports, 1-element vectors in the model (ZeRO-3 cannot partition 0-dim parameters).
_SCALAR_KEYS = ("logit_scale", "logit_bias")


def build_vision_tower(spec: ModelSpec) -> nn.Module:
    vision = spec.vision
    if vision.kind == "resnet":
        return ModifiedResNet(
            layers=vision.layers,
            width=vision.width,
            heads=vision.heads,
            image_size=vision.image_size,
            output_dim=spec.embed_dim,
        )
    return VisionTransformer(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        width=vision.width,
        layers=vision.layers,
        heads=vision.heads,
        output_dim=spec.embed_dim,
        quick_gelu=spec.quick_gelu,
    )



def to_openai_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of :class:`CLIP` in OpenAI's released layout: the same names, ``logit_scale`` 0-dim
    (stored here as a 1-element vector because DeepSpeed ZeRO-3 cannot partition 0-dim parameters).
    A SigLIP model's ``logit_bias`` is the one extra key, 0-dim like the scale (as open_clip stores it)."""
    return {**state, **{key: state[key].reshape(()) for key in _SCALAR_KEYS if key in state}}

class CLIP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        text = spec.text
        self.visual = build_vision_tower(spec)
        self.transformer = Transformer(text.width, text.layers, text.heads, quick_gelu=spec.quick_gelu, causal=True)
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.ln_final = nn.LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.empty(text.width, spec.embed_dim))
        self.logit_scale = nn.Parameter(torch.full((1,), spec.init_logit_scale))
        if spec.init_logit_bias is None:
            self.register_parameter("logit_bias", None)  # CLIP's softmax loss has no bias; the state dict no key
        else:
            self.logit_bias = nn.Parameter(torch.full((1,), spec.init_logit_bias))
        self.register_load_state_dict_pre_hook(_accept_scalar_logit_parameters)
        self.init_weights()

    @property
    def image_size(self) -> int:
        return self.spec.vision.image_size

    @property
    def context_length(self) -> int:
        return self.spec.text.context_length

    def init_weights(self) -> None:
        """OpenAI's initialisation (``CLIP.initialize_parameters``), tower by tower."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.spec.text.width**-0.5)
        self.transformer.init_weights()
        self.visual.init_weights()

    def set_grad_checkpointing(self, vision: bool = True, text: bool = True) -> None:
        """Recompute each residual block in backward instead of storing its activations."""
        tower = self.visual.transformer if isinstance(self.visual, VisionTransformer) else self.visual
        tower.grad_checkpointing = vision
        self.transformer.grad_checkpointing = text

    def set_patch_dropout(self, fraction: float) -> None:
        """Drop this share of each image's patch tokens in training mode (FLIP); 0 switches it off.

        Evaluation mode never drops tokens. The training loop calls ``set_patch_dropout(0.0)`` for FLIP's
        final unmasked steps; only a ViT image tower supports a fraction above 0.
        """
        fraction = check_patch_dropout(fraction)
        if not isinstance(self.visual, VisionTransformer):
            if fraction > 0.0:
                raise ValueError(f"patch dropout needs a ViT image tower; {self.spec.name} has a {self.spec.vision.kind}")
            return
        self.visual.patch_dropout = fraction

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text features: final LayerNorm output at the [EOS] position, projected.

        [EOS] has the largest id, so ``argmax`` finds it. The mask is causal and only the [EOS] position
        is read, so tokens after the batch's last [EOS] cannot influence the result: the tower runs on
        ``tokens[:, :longest]`` only, which is exact and skips most of the work on short captions.
        """
        eos = tokens.argmax(dim=-1)  # (B,)
        trimmable = tokens.numel() and tokens.device.type != "meta"  # meta tensors hold no ids to read
        length = int(eos.max()) + 1 if trimmable else tokens.shape[1]
        x = self.token_embedding(tokens[:, :length]) + self.positional_embedding[:length]  # (B, L, D)
        x = self.ln_final(self.transformer(x))
        features = x[torch.arange(x.shape[0], device=x.device), eos] @ self.text_projection  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(normalised image features, normalised text features, exp(logit_scale) clamped at the maximum),
        then, for a SigLIP model only, the logit bias (0-dim): exactly the arguments of the model's loss."""
        image_features = self.encode_image(images, normalize=True)
        text_features = self.encode_text(tokens, normalize=True)
        if self.logit_bias is None:
            return image_features, text_features, self.logit_scale_exp()
        # a copy, not a view of the parameter's storage, which ZeRO-3 re-partitions after the forward
        return image_features, text_features, self.logit_scale_exp(), self.logit_bias.squeeze(0).clone()

    def logit_scale_exp(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.spec.max_logit_scale).squeeze(0)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep the stored log-temperature within [0, log(max scale)] after an optimizer step (the paper)."""
        self.logit_scale.clamp_(0.0, math.log(self.spec.max_logit_scale))

    def openai_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in the layout of OpenAI's released checkpoints (0-dim ``logit_scale``)."""
        return to_openai_layout({name: tensor.detach().clone() for name, tensor in self.state_dict().items()})

    def load_openai_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load OpenAI-layout weights strictly: every key used, every shape equal.

        The JIT checkpoints' metadata entries (resolution, context length, vocab size) are checked
        against this model's spec and dropped. One exception to strictness: a SigLIP model loading weights
        without ``logit_bias`` (OpenAI's, or a CLIP run's) keeps its initial bias, which is how SigLIP
        fine-tuning from CLIP weights starts.
        """
        state = dict(state_dict)
        if self.logit_bias is not None and "logit_bias" not in state:
            state["logit_bias"] = self.logit_bias.detach().clone()
        expected = {
            "input_resolution": self.spec.vision.image_size,
            "context_length": self.spec.text.context_length,
            "vocab_size": self.spec.text.vocab_size,
        }
        for key in _OPENAI_METADATA_KEYS:
            if key in state and int(state.pop(key)) != expected[key]:
                raise ValueError(f"checkpoint {key}={int(state_dict[key])} but {self.spec.name} has {expected[key]}")
        own = self.state_dict()
        mismatched = [
            f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
            for key, value in state.items()
            if key in own and key not in _SCALAR_KEYS and value.shape != own[key].shape
        ]
        if mismatched:
            raise ValueError(f"shape mismatch loading into {self.spec.name}: " + "; ".join(mismatched[:10]))
        self.load_state_dict(state, strict=True)


def _accept_scalar_logit_parameters(module, state_dict, prefix, *args) -> None:
    """Let 0-dim ``logit_scale``/``logit_bias`` load into the 1-element parameters (plain ``load_state_dict`` too)."""
    for key in (prefix + name for name in _SCALAR_KEYS):
        if key in state_dict and state_dict[key].ndim == 0:
            state_dict[key] = state_dict[key].reshape(1)


# Exempt from weight decay by name, besides every gain and bias (ndim < 2).
NO_DECAY_NAMES = frozenset({"token_embedding", "positional_embedding", "class_embedding", "logit_scale"})


def exempt_from_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    """Gains, biases, embeddings and the logit scale are not decayed (the paper's AdamW setup)."""
    return parameter.ndim < 2 or any(part in NO_DECAY_NAMES for part in name.split("."))


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer parameter groups: decayed weight matrices, and the exempt rest (weight_decay 0).

    Frozen parameters (``requires_grad`` False: a locked tower, a fixed temperature) are in neither group, so an
    optimizer or DeepSpeed engine built from these groups holds no gradient or state for them.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if exempt_from_weight_decay(name, parameter) else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
