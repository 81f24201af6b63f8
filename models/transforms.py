"""Image preprocessing as in the paper: random-resized crops for training, resize + center crop for eval.

Both transforms accept a PIL image or an ``(H, W, 3)`` / ``(H, W)`` uint8 array (what the data pipeline
decodes to) and return a ``(3, R, R)`` tensor: float32 normalised with CLIP's mean/std by default, or
uint8 with ``normalize=False`` so that the (4x cheaper) uint8 batch travels to the training worker and
:func:`normalize_images` runs there.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

# Per-channel statistics of OpenAI's training set, used by every released CLIP checkpoint.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TRAIN_CROP_SCALE = (0.9, 1.0)

ImageLike = Image.Image | np.ndarray | torch.Tensor


def _to_uint8_chw(image: ImageLike) -> torch.Tensor:
    """PIL image, HWC/HW uint8 array or CHW uint8 tensor -> contiguous (3, H, W) uint8 tensor."""
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8, got {image.dtype}")
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        elif image.ndim == 3 and image.shape[2] == 4:
            image = image[:, :, :3]
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) array, got shape {image.shape}")
        if not image.flags.writeable:  # torch warns on read-only buffers; nothing here writes, but copy anyway
            image = image.copy()
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # HWC -> CHW
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3:
        return image if image.shape[0] == 3 else image.expand(3, -1, -1)
    raise TypeError(f"unsupported image type {type(image).__name__}")


def normalize_images(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float normalised with CLIP's mean/std (runs on the batch's device)."""
    mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255.0
    return (images.to(dtype) - mean) / std


def image_transform(resolution: int, *, train: bool, normalize: bool = True) -> Callable[[ImageLike], torch.Tensor]:
    """The paper's preprocessing for one image at ``resolution`` pixels square.

    Training: RandomResizedCrop with scale (0.9, 1.0) (the paper's only augmentation), bicubic.
    Eval: resize the shorter side to ``resolution`` (bicubic) and center-crop, as OpenAI's ``preprocess``.
    Resizing runs on uint8 tensors with antialiasing, which matches PIL's bicubic resampling closely.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    bicubic = v2.InterpolationMode.BICUBIC
    if train:
        geometry = v2.RandomResizedCrop(resolution, scale=TRAIN_CROP_SCALE, interpolation=bicubic, antialias=True)
    else:
        geometry = v2.Compose(
            [v2.Resize(resolution, interpolation=bicubic, antialias=True), v2.CenterCrop(resolution)]
        )

    def transform(image: ImageLike) -> torch.Tensor:
        pixels = geometry(_to_uint8_chw(image))
        if not normalize:
            return pixels
        return normalize_images(pixels.unsqueeze(0))[0]

    return transform
