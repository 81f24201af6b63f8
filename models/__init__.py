"""rayclip's model library: the paper's CLIP architectures, tokenizer, loss and zero-shot evaluation.

Pure single-device PyTorch: nothing here imports ray, deepspeed, mlflow or torch.distributed. Distribution
is applied from ``orchestrator/`` (e.g. by passing a distributed ``gather`` to :class:`ClipLoss`, a ring
exchange of text blocks to :class:`SigLipLoss`), which imports only what this ``__init__`` exports (a test
holds it to that).
"""

from models.clip import CLIP, to_openai_layout, weight_decay_groups
from models.locking import TOWERS, ParameterCounts, Tower, count_parameters, lock_tower, tower_blocks, tower_of, tower_parameters
from models.loss import ClipLoss, Gather, SigLipLoss, TextBlocks
from models.openai_checkpoint import load_openai_checkpoint, spec_from_openai_state_dict
from models.registry import PAPER_MODELS, create_model, get_model_spec, list_models
from models.spec import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE, ModelSpec, TextSpec, VisionSpec, siglip_spec
from models.tokenizer import get_tokenizer
from models.transforms import channels_last_batch_to_model, image_transform, normalize_images
from models.vit import kept_patch_count
from models.zero_shot import IMAGENET_TEMPLATES, build_zero_shot_classifier, imagenet_classes, retrieval_recall

__all__ = [
    "CLIP",
    "ClipLoss",
    "Gather",
    "IMAGENET_TEMPLATES",
    "ModelSpec",
    "TOWERS",
    "TextSpec",
    "Tower",
    "VisionSpec",
    "PAPER_MODELS",
    "ParameterCounts",
    "SIGLIP_INIT_LOGIT_BIAS",
    "SIGLIP_INIT_LOGIT_SCALE",
    "SigLipLoss",
    "TextBlocks",
    "build_zero_shot_classifier",
    "channels_last_batch_to_model",
    "count_parameters",
    "create_model",
    "get_model_spec",
    "get_tokenizer",
    "image_transform",
    "imagenet_classes",
    "kept_patch_count",
    "list_models",
    "lock_tower",
    "load_openai_checkpoint",
    "normalize_images",
    "retrieval_recall",
    "siglip_spec",
    "spec_from_openai_state_dict",
    "to_openai_layout",
    "tower_blocks",
    "tower_of",
    "tower_parameters",
    "weight_decay_groups",
]
