"""The paper's train and eval image preprocessing, on PIL images and on uint8 arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from models.transforms import CLIP_MEAN, CLIP_STD, image_transform, normalize_images


def photo(height=300, width=200, seed=0) -> np.ndarray:
    """A smooth random image (resampling differences stay small on smooth content, as on photos)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 10, width // 10, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def openai_preprocess(resolution):
    """OpenAI's ``clip.load`` preprocess: PIL bicubic resize of the short side, center crop, normalise."""
    return T.Compose(
        [
            T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(resolution),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def test_eval_transform_matches_openais_preprocess():
    array = photo()
    ours = image_transform(224, train=False)(array)
    theirs = openai_preprocess(224)(Image.fromarray(array))
    assert ours.shape == theirs.shape == (3, 224, 224)
    # Tensor bicubic vs PIL bicubic: within a couple of grey levels (1/255/std ~ 0.015 per level).
    assert (ours - theirs).abs().mean() < 0.02
    torch.testing.assert_close(image_transform(224, train=False)(Image.fromarray(array)), ours)


def test_train_transform_crops_randomly_at_the_target_size():
    array = photo(200, 200, seed=1)  # (non-square images often fall back to a center crop at scale >= 0.9)
    transform = image_transform(64, train=True)
    torch.manual_seed(0)
    first, second = transform(array), transform(array)
    assert first.shape == second.shape == (3, 64, 64)
    assert not torch.equal(first, second)
    assert first.dtype == torch.float32


def test_uint8_output_then_normalize_equals_float_output():
    array = photo(seed=2)
    raw = image_transform(32, train=False, normalize=False)(array)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 32, 32)
    torch.testing.assert_close(normalize_images(raw.unsqueeze(0))[0], image_transform(32, train=False)(array))


def test_greyscale_and_rgba_inputs_become_three_channels():
    grey = np.full((28, 28), 200, dtype=np.uint8)
    out = image_transform(32, train=False, normalize=False)(grey)
    assert out.shape == (3, 32, 32) and torch.all(out[:, 10:20, 10:20] == 200)
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    assert image_transform(32, train=True)(rgba).shape == (3, 32, 32)


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="must be uint8"):
        image_transform(32, train=False)(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="expected an \\(H, W, 3\\) array"):
        image_transform(32, train=False)(np.zeros((8, 8, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="resolution must be positive"):
        image_transform(0, train=False)
