"""Tower locking: freeze the image or the text tower of a CLIP, optionally leaving its last N blocks trainable.

LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning") trains a text tower from
scratch against a pretrained image tower that never changes. Locking here only sets ``requires_grad`` to
False: :func:`models.clip.weight_decay_groups` leaves such parameters out of the optimizer, so a training
engine built from those groups keeps neither a gradient nor optimizer state for them (and ZeRO partitions
neither), and their values stay bit-identical.

What counts as a block for "the last N stay trainable":

* ViT image tower: its Transformer blocks; with N >= 1 the tower's head (``ln_post``, ``proj``) trains too,
  while the patch embedding, class and position embeddings and ``ln_pre`` stay locked;
* ResNet image tower: its four stages and then the attention pool, which is the tower's head and so counts
  as the last block (N = 1 trains the attention pool alone); the stem stays locked;
* text tower: its Transformer blocks; with N >= 1 ``ln_final`` and ``text_projection`` train too, the token
  and position embeddings stay locked.

Locked BatchNorm layers (the ResNet tower's) would still move their running statistics in training mode,
which changes what a locked tower computes; with ``norm_stats`` they normalise as in evaluation whatever
mode the model is in. The modules are kept (a forward pre-hook switches them to evaluation mode), so the
state dict keeps OpenAI's layout. The temperature and SigLIP's bias belong to neither tower: a tower lock
never freezes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from torch import nn

from models.clip import CLIP
from models.resnet import ModifiedResNet

Tower = Literal["image", "text"]
TOWERS: tuple[Tower, ...] = ("image", "text")
# CLIP's top-level attributes that make up the text tower; the image tower is ``visual``.
TEXT_TOWER_ATTRIBUTES = frozenset({"token_embedding", "positional_embedding", "transformer", "ln_final",
                                   "text_projection"})
# Top-level parameters outside both towers: the loss's temperature and SigLIP's bias.
LOGIT_PARAMETERS = frozenset({"logit_scale", "logit_bias"})
NORM_LAYERS = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)

# A block or head part: a submodule, or a bare parameter (projections and embeddings are plain parameters).
_Part = nn.Module | nn.Parameter


def tower_of(parameter_name: str) -> Literal["image", "text", "logit"]:
    """Which part of a :class:`CLIP` a parameter (named as in ``named_parameters``) belongs to."""
    top = parameter_name.split(".", 1)[0]
    if top == "visual":
        return "image"
    if top in TEXT_TOWER_ATTRIBUTES:
        return "text"
    if top in LOGIT_PARAMETERS:
        return "logit"
    raise ValueError(f"{parameter_name!r} is in neither tower of the CLIP model nor one of its logit parameters")


def tower_parameters(model: CLIP, tower: Tower) -> dict[str, nn.Parameter]:
    """The named parameters of one tower."""
    return {name: parameter for name, parameter in model.named_parameters() if tower_of(name) == tower}


def tower_blocks(model: CLIP, tower: Tower) -> tuple[list[_Part], list[_Part]]:
    """(the tower's blocks in order, the head that trains with the last unlocked block), see the module doc."""
    if tower == "text":
        return list(model.transformer.resblocks), [model.ln_final, model.text_projection]
    visual = model.visual
    if isinstance(visual, ModifiedResNet):
        return [visual.layer1, visual.layer2, visual.layer3, visual.layer4, visual.attnpool], []
    return list(visual.transformer.resblocks), [visual.ln_post, visual.proj]


def lock_tower(model: CLIP, tower: Tower, unlocked_layers: int = 0, *, norm_stats: bool = True,
               norm_params: bool = False) -> None:
    """Freeze ``tower`` except its last ``unlocked_layers`` blocks (and, when that is at least 1, its head).

    ``norm_stats``: the locked BatchNorm layers normalise with their running statistics and never update
    them, also after ``model.train()``. ``norm_params``: the LayerNorm/BatchNorm weights inside the unlocked
    blocks and head are frozen too, so only their linear and convolution weights (and embeddings) train.
    """
    blocks, head = tower_blocks(model, tower)
    if not 0 <= unlocked_layers <= len(blocks):
        raise ValueError(f"unlocked_layers={unlocked_layers}: the {tower} tower of {model.spec.name} has "
                         f"{len(blocks)} blocks; allowed: 0..{len(blocks)}")
    unlocked = blocks[len(blocks) - unlocked_layers:] + (head if unlocked_layers else [])
    trainable = {id(parameter) for part in unlocked for parameter in _parameters(part)}
    for parameter in tower_parameters(model, tower).values():
        parameter.requires_grad_(id(parameter) in trainable)
    unlocked_modules = [module for part in unlocked if isinstance(part, nn.Module) for module in part.modules()]
    if norm_params:
        for module in unlocked_modules:
            if isinstance(module, NORM_LAYERS):
                module.requires_grad_(False)
    if norm_stats:
        live = {id(module) for module in unlocked_modules}
        for module in _tower_modules(model, tower):
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and id(module) not in live:
                module.register_forward_pre_hook(_normalise_as_in_evaluation)


def _parameters(part: _Part) -> Iterator[nn.Parameter]:
    return iter([part]) if isinstance(part, nn.Parameter) else part.parameters()


def _tower_modules(model: CLIP, tower: Tower) -> Iterator[nn.Module]:
    if tower == "image":
        return model.visual.modules()
    return (module for name, child in model.named_children() if name in TEXT_TOWER_ATTRIBUTES
            for module in child.modules())


def _normalise_as_in_evaluation(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a locked BatchNorm: running statistics in, none updated, whatever the model's mode."""
    module.train(False)


@dataclass(frozen=True)
class ParameterCounts:
    """Trainable and frozen parameter elements of a CLIP, per part ("image", "text", "logit")."""

    trainable: dict[str, int]
    frozen: dict[str, int]

    @property
    def total_trainable(self) -> int:
        return sum(self.trainable.values())

    @property
    def total_frozen(self) -> int:
        return sum(self.frozen.values())

    def describe(self) -> str:
        """``image 0.0M trainable / 5.3M frozen, text 4.1M / 0.0M, logit 1 / 0``: one line for a log."""
        parts = [f"{part} {_millions(self.trainable[part])} trainable / {_millions(self.frozen[part])} frozen"
                 for part in self.trainable]
        return ", ".join(parts)


def count_parameters(model: CLIP) -> ParameterCounts:
    """The model's trainable and frozen parameter elements per tower (and the logit parameters)."""
    trainable = {"image": 0, "text": 0, "logit": 0}
    frozen = dict(trainable)
    for name, parameter in model.named_parameters():
        (trainable if parameter.requires_grad else frozen)[tower_of(name)] += parameter.numel()
    return ParameterCounts(trainable, frozen)


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 10_000 else str(count)
