"""Samples -> L2-normalised features, on whatever device holds the model: the one step every evaluation shares.

:class:`FeatureEncoder` decodes and preprocesses images as the paper evaluates them (resize the short
side, center crop, CLIP's mean/std: ``models.image_transform(train=False)``), tokenizes captions and
prompts, and runs the towers. It runs inside the Ray Data actors of ``jobs/evaluate.py`` (a model of
its own, on a GPU when the cluster has one) and inside the Train workers for the in-loop evaluation
(the engine's module, under ZeRO-3 only whole when every rank runs the forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models import get_tokenizer, image_transform, normalize_images
from orchestrator.data import decode_image


@dataclass
class Pixels:
    """A preprocessed batch: uint8 (B, 3, R, R) images and, per input, whether it decoded."""

    images: torch.Tensor
    decoded: list[bool]


class Preprocess:
    """Decode + resize the short side + center crop to uint8 (B, 3, R, R): the paper's evaluation transform."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        self.transform = image_transform(image_size, train=False, normalize=False)

    def __call__(self, images: Sequence[bytes]) -> Pixels:
        """An image that does not decode is left out of ``images`` and marked False in ``decoded``."""
        size = self.image_size
        out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
        decoded = []
        for encoded in images:
            try:
                self.transform.into(decode_image(encoded), out[sum(decoded)])
                decoded.append(True)
            except Exception:  # any decoder error means this sample only is bad
                decoded.append(False)
        return Pixels(out[:sum(decoded)], decoded)


class FeatureEncoder:
    """Preprocess and encode batches with ``model`` on ``device`` (bf16 autocast when ``bf16``)."""

    def __init__(self, model, *, device: torch.device | str = "cpu", bf16: bool = False):
        self.model = model
        self.device = torch.device(device)
        self.bf16 = bf16
        self.image_size = model.image_size
        self.pixels = Preprocess(self.image_size)
        self.tokenizer = get_tokenizer(context_length=model.context_length)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, E) float32 normalised image features, on the CPU, of uint8 (B, 3, R, R) images."""
        if not len(images):  # an empty batch still runs the tower: under ZeRO-3 every rank's forward is collective
            images = torch.zeros((1, 3, self.image_size, self.image_size), dtype=torch.uint8)
            return self.image_features(images)[:0]
        with self._autocast():
            features = self.model.encode_image(normalize_images(images.to(self.device)))
        return F.normalize(features.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(T, E) float32 normalised text features, on the CPU."""
        if not texts:
            return self.text_features(["."])[:0]
        with self._autocast():
            features = self.model.encode_text(self.tokenizer(list(texts)).to(self.device))
        return F.normalize(features.float(), dim=-1).cpu()

