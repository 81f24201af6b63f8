"""rayclip's model library: the paper's CLIP architectures, tokenizer, loss and zero-shot evaluation.

Pure single-device PyTorch: nothing here imports ray, deepspeed, mlflow or torch.distributed. Distribution
is applied from ``orchestrator/`` (e.g. by passing a distributed ``gather`` to :class:`ClipLoss`).
"""

from models.clip import CLIP
from models.registry import PAPER_MODELS, create_model, get_model_spec, list_models
from models.loss import ClipLoss
from models.spec import ModelSpec, TextSpec, VisionSpec
from models.tokenizer import get_tokenizer

__all__ = [
    "CLIP",
    "ClipLoss",
    "ModelSpec",
    "TextSpec",
    "VisionSpec",
    "PAPER_MODELS",
    "create_model",
    "get_model_spec",
    "get_tokenizer",
    "list_models",
]
