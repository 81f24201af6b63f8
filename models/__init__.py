"""rayclip's model library: the paper's CLIP architectures, tokenizer, loss and zero-shot evaluation.

Pure single-device PyTorch: nothing here imports ray, deepspeed, mlflow or torch.distributed. Distribution
is applied from ``orchestrator/`` (e.g. by passing a distributed ``gather`` to :class:`ClipLoss`, a ring
exchange of text blocks to :class:`SigLipLoss`), which imports only what this ``__init__`` exports (a test
holds it to that).

The names below load on first use (PEP 562): a process that needs only the registry or the tokenizer (a config
check, a small Ray actor) does not pay for importing torch and torchvision, seconds on a small machine.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "models.clip": ("CLIP", "to_openai_layout", "weight_decay_groups"),
    "models.flops": ("forward_flops",),
    "models.locking": ("TOWERS", "ParameterCounts", "Tower", "count_parameters", "lock_tower", "tower_blocks",
                       "tower_of", "tower_parameters"),
    "models.loss": ("ClipLoss", "Gather", "SigLipLoss", "TextBlocks"),
    "models.openai_checkpoint": ("load_openai_checkpoint", "spec_from_openai_state_dict"),
    "models.registry": ("PAPER_MODELS", "create_model", "get_model_spec", "list_models"),
    "models.spec": ("SIGLIP_INIT_LOGIT_BIAS", "SIGLIP_INIT_LOGIT_SCALE", "ModelSpec", "TextSpec", "VisionSpec",
                    "siglip_spec"),
    "models.tokenizer": ("get_tokenizer",),
    "models.transforms": ("channels_last_batch_to_model", "image_transform", "normalize_images"),
    "models.vit": ("kept_patch_count",),
    "models.zero_shot": ("IMAGENET_TEMPLATES", "build_zero_shot_classifier", "imagenet_classes", "retrieval_recall",
                         "zero_shot_class_embeddings"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
