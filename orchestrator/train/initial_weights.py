"""``model.init_from``: a run that starts from existing weights (OpenAI's released files, or a rayclip run).

Runs on every Train worker (each loads the same file, so every rank starts from the same weights, as a seeded
initialisation would) and, as a check before Ray starts, on the driver. The source is resolved exactly as
``jobs/evaluate.py --model`` resolves its argument (``orchestrator.eval.load_model``): a file, a checkpoint or
run folder, or a run name, local or ``s3://``. Only the weights are taken: unlike ``--resume``, the step,
the optimizer state and the data position start fresh. A resumed run builds its model the same way and then
loads its checkpoint over it, so the initial weights only matter to a run's first attempt.
"""

from __future__ import annotations

import torch

from models import CLIP, ModelSpec, tower_of
from orchestrator.config import RunConfig
from orchestrator.eval import LoadedModel, load_model


def load_initial_weights(model: CLIP, cfg: RunConfig) -> str:
    """Load the towers of ``cfg.model.init_towers`` from ``cfg.model.init_from`` into ``model``; one line for the log.

    The temperature (and SigLIP's bias, when the file and the model both have one) is loaded with both towers
    only, as it was learnt against that pair, and not when ``loss.learn_temperature: false`` fixes it at
    ``loss.init_temperature``. Raises ``ValueError`` naming ``model.init_from`` when the source
    cannot be read or holds another architecture than ``model.name``.
    """
    loaded = _resolve(cfg)
    _check_architecture(loaded.model, model, cfg)
    towers = set(cfg.model.init_towers)
    with_logits = towers == {"image", "text"} and cfg.loss.learn_temperature
    own = model.state_dict()
    state = {name: value for name, value in loaded.model.state_dict().items()
             if name in own and (tower_of(name) in towers or (tower_of(name) == "logit" and with_logits))}
    model.load_state_dict(state, strict=False)  # the architecture check made every loaded key and shape the model's
    what = " and ".join(f"{tower} tower" for tower in cfg.model.init_towers)
    logits = ", temperature" if "logit_scale" in state else ""
    return f"initial weights: {what}{logits} ({len(state)} tensors) from {loaded.kind} {loaded.source}"


def check_initial_weights(cfg: RunConfig) -> None:
    """Raise ``ValueError`` naming ``model.init_from`` unless it resolves to weights of ``model.name``'s architecture.

    The driver's check before Ray starts. It reads the source as a worker will: an OpenAI-layout file is loaded
    whole into a CPU model (a 605 MB fp32 ViT-B/32 export: 1.8 s and a 2.0 GB peak resident size on a laptop
    CPU; ViT-L/14 about three times that), and a checkpoint folder without its export has its ZeRO partitions
    consolidated first. The run's own architecture is built on the meta device, which allocates nothing.
    """
    loaded = _resolve(cfg)
    with torch.device("meta"):
        reference = CLIP(cfg.model.spec())
    _check_architecture(loaded.model, reference, cfg)


def _resolve(cfg: RunConfig) -> LoadedModel:
    try:
        return load_model(cfg.model.init_from, cfg, argument="model.init_from")
    except (OSError, ValueError) as error:
        raise ValueError(str(error) if "model.init_from" in str(error)
                         else f"model.init_from={cfg.model.init_from!r}: {error}") from None


def _check_architecture(source: CLIP, target: CLIP, cfg: RunConfig) -> None:
    """Every tensor of the run's model exists in the source with the same shape and no other does (SigLIP's
    bias aside: either side may lack it), else a ``ValueError`` that says what the source holds."""
    own = {name: tuple(value.shape) for name, value in target.state_dict().items()}
    theirs = {name: tuple(value.shape) for name, value in source.state_dict().items()}
    differing = sorted(name for name in (own.keys() | theirs.keys()) - {"logit_bias"} if own.get(name) != theirs.get(name))
    if differing:
        details = "; ".join(f"{name}: file {theirs.get(name, 'absent')} vs run {own.get(name, 'absent')}"
                            for name in differing[:3])
        raise ValueError(f"model.init_from={cfg.model.init_from!r} holds {_describe_spec(source.spec)}, but "
                         f"model.name={cfg.model.name!r} is {_describe_spec(target.spec)} ({len(differing)} tensors "
                         f"differ: {details}); allowed: weights of model.name's architecture, or model.name set to "
                         f"the file's")


def _describe_spec(spec: ModelSpec) -> str:
    """``ViT-B/32 (ViT 12 x 768, patch 32, 224 px; text 12 x 512, context 77, embedding 512)``."""
    vision = spec.vision
    tower = (f"ViT {vision.layers} x {vision.width}, patch {vision.patch_size}" if vision.kind == "vit"
             else f"ResNet {'-'.join(map(str, vision.layers))}, width {vision.width}")
    return (f"{spec.name} ({tower}, {vision.image_size} px; text {spec.text.layers} x {spec.text.width}, "
            f"context {spec.text.context_length}, embedding {spec.embed_dim})")
