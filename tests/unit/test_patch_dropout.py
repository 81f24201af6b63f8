"""FLIP's patch dropout: training-only, class token always kept, per-image subsets, switchable at run time."""

from __future__ import annotations

import pytest
import torch

from models import create_model
from tests.factories import random_batch

PATCHES = 64  # ViT-tiny: 32 px images in 4 px patches


def _model(patch_dropout: float = 0.0):
    torch.manual_seed(0)
    model = create_model("ViT-tiny")
    model.set_patch_dropout(patch_dropout)
    return model


def _transformer_input_lengths(model, images: torch.Tensor) -> list[int]:
    """Token counts the image tower's Transformer receives for one forward of ``images``."""
    lengths = []
    handle = model.visual.transformer.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    try:
        model.encode_image(images)
    finally:
        handle.remove()
    return lengths


def test_evaluation_is_bit_identical_with_the_option_set():
    images = torch.randn(4, 3, 32, 32)
    plain, dropping = _model().eval(), _model(0.5).eval()
    with torch.no_grad():
        assert torch.equal(plain.encode_image(images), dropping.encode_image(images))
        torch.manual_seed(1)
        trained = dropping.train().encode_image(images)
    assert not torch.allclose(trained, plain.encode_image(images))  # the option does act in training mode
    assert plain.openai_state_dict().keys() == dropping.openai_state_dict().keys()  # exports are unchanged


@pytest.mark.parametrize("fraction, kept", [(0.5, 32), (0.75, 16), (0.1, 58), (0.99, 1)])
def test_training_keeps_the_class_token_and_round_one_minus_p_patches(fraction, kept):
    model = _model(fraction).train()
    assert _transformer_input_lengths(model, torch.randn(3, 3, 32, 32)) == [1 + kept]
    assert model.visual.kept_patches(PATCHES) == max(1, round((1 - fraction) * PATCHES))
    tokens = torch.arange(1 + PATCHES, dtype=torch.float).view(1, -1, 1).expand(5, -1, 8)  # token i holds i
    kept_ids = model.visual._drop_patches(tokens)[..., 0].long()  # (5, 1+kept)
    assert (kept_ids[:, 0] == 0).all()  # the class token, first
    for row in kept_ids[:, 1:]:
        assert len(set(row.tolist())) == kept and 1 <= int(row.min()) and int(row.max()) <= PATCHES


def test_each_image_keeps_its_own_subset_from_the_global_generator():
    visual = _model(0.5).visual.train()
    tokens = torch.arange(1 + PATCHES, dtype=torch.float).view(1, -1, 1).expand(8, -1, 4)
    torch.manual_seed(3)
    first = visual._drop_patches(tokens)[..., 0]
    subsets = {frozenset(row.tolist()) for row in first}
    assert len(subsets) == 8  # 8 images, 8 different subsets (a collision has odds ~1e-17)
    torch.manual_seed(3)
    assert torch.equal(visual._drop_patches(tokens)[..., 0], first)  # the caller's seed decides
    assert not torch.equal(visual._drop_patches(tokens)[..., 0], first)


def test_the_switch_turns_it_off_and_on_at_run_time():
    model = _model(0.5).train()
    images = torch.randn(2, 3, 32, 32)
    assert _transformer_input_lengths(model, images) == [33]
    model.set_patch_dropout(0.0)  # FLIP's final unmasked steps
    assert _transformer_input_lengths(model, images) == [1 + PATCHES]
    model.set_patch_dropout(0.75)
    assert _transformer_input_lengths(model, images) == [17]


def test_invalid_fractions_and_resnet_towers_are_refused():
    for fraction in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"patch_dropout must be in \[0, 1\)"):
            _model().set_patch_dropout(fraction)
    resnet = create_model("RN-tiny")
    resnet.set_patch_dropout(0.0)  # switching off is always allowed
    with pytest.raises(ValueError, match="needs a ViT image tower; RN-tiny has a resnet"):
        resnet.set_patch_dropout(0.5)


def _train_step_gradients(model, checkpointing: bool) -> dict[str, torch.Tensor]:
    images, tokens = random_batch(4, seed=5)
    model.set_grad_checkpointing(vision=checkpointing, text=checkpointing)
    model.zero_grad()
    torch.manual_seed(11)
    image_features, text_features, scale = model.train()(images, tokens)
    (scale * image_features @ text_features.T).logsumexp(dim=1).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_forward_backward_with_and_without_gradient_checkpointing_agree():
    model = _model(0.5)
    plain = _train_step_gradients(model, checkpointing=False)
    checkpointed = _train_step_gradients(model, checkpointing=True)
    assert plain.keys() == checkpointed.keys() and "visual.conv1.weight" in plain
    assert all(torch.isfinite(grad).all() for grad in plain.values())
    assert float(plain["visual.conv1.weight"].abs().sum()) > 0
    for name, grad in plain.items():  # same seed, same kept patches: recomputation changes nothing
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
