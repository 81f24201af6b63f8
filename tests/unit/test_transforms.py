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


@pytest.mark.parametrize("height, width", [(256, 256), (300, 200), (180, 250), (40, 30)])
def test_channels_last_resize_equals_torchvisions_transforms_exactly(height, width):
    """The fast path (resize in the decoder's HWC memory) is the same function as torchvision's."""
    from torchvision.transforms import v2

    hwc = torch.from_numpy(photo(height, width, seed=3).copy())
    decoded = hwc.permute(2, 0, 1)  # what the JPEG decoder hands over: HWC memory viewed as CHW
    bicubic = v2.InterpolationMode.BICUBIC
    reference_eval = v2.Compose([v2.Resize(64, interpolation=bicubic, antialias=True), v2.CenterCrop(64)])
    assert torch.equal(image_transform(64, train=False, normalize=False)(decoded), reference_eval(decoded.contiguous()))
    train = image_transform(64, train=True, normalize=False)
    for seed in range(3):
        train.rng.seed(seed)
        box = train.sample_crop(height, width)
        reference = v2.functional.resized_crop(decoded.contiguous(), *box, [64, 64], interpolation=bicubic, antialias=True)
        train.rng.seed(seed)  # the same draw again, inside the transform
        ours = train(decoded)
        assert ours.is_contiguous() and torch.equal(ours, reference), box
        out = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
        train.rng.seed(seed)
        train.into(decoded, out[1])
        assert torch.equal(out[1], reference) and not out[0].any()


def test_random_crops_follow_the_papers_scale_and_aspect_ranges():
    transform = image_transform(64, train=True, seed=1)
    boxes = [transform.sample_crop(240, 256) for _ in range(2000)]
    fractions = np.array([h * w / (240 * 256) for _, _, h, w in boxes])
    aspects = np.array([w / h for _, _, h, w in boxes])
    assert all(0 <= top <= 240 - h and 0 <= left <= 256 - w for top, left, h, w in boxes)
    assert fractions.min() > 0.88 and fractions.max() <= 1.0  # scale (0.9, 1.0) up to rounding
    assert aspects.min() > 0.74 and aspects.max() < 4 / 3 + 0.02
    assert len(set(boxes)) > 200  # really random
    again = image_transform(64, train=True, seed=1)
    assert [again.sample_crop(240, 256) for _ in range(5)] == boxes[:5]  # seeded: reproducible
    # A shape no sampled crop fits (too elongated) falls back to the largest central crop of ratio 4/3.
    assert transform.sample_crop(100, 1000) == (0, (1000 - 133) // 2, 100, 133)


def test_channels_last_batch_becomes_the_models_normalised_layout():
    from models.transforms import channels_last_batch_to_model

    nchw = torch.from_numpy(np.stack([photo(16, 16, seed=s) for s in range(3)])).permute(0, 3, 1, 2).contiguous()
    stream = nchw.permute(0, 2, 3, 1).contiguous()  # what the data stream ships: (B, R, R, 3)
    model_input = channels_last_batch_to_model(stream)
    assert model_input.shape == (3, 3, 16, 16) and model_input.is_contiguous()
    assert torch.equal(model_input, normalize_images(nchw))
    expected = (nchw[1, 2, 5, 7].item() - CLIP_MEAN[2] * 255) / (CLIP_STD[2] * 255)
    assert abs(model_input[1, 2, 5, 7].item() - expected) < 1e-5
    already_float = channels_last_batch_to_model(model_input.permute(0, 2, 3, 1).contiguous(), torch.float64)
    assert already_float.dtype == torch.float64 and already_float.is_contiguous()
    torch.testing.assert_close(already_float, model_input.double())
