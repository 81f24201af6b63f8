"""SigLIP: the sigmoid loss against the paper's formula, the model's bias and its export, and the ring
exchange across 2, 3 (uneven shares) and 4 real gloo processes reproducing the single-process global batch."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from harness.local_servers import free_port
from models import CLIP, SigLipLoss, create_model, get_model_spec, siglip_spec, weight_decay_groups
from models.openai_checkpoint import load_openai_checkpoint
from orchestrator.siglip_exchange import ring_text_blocks
from tests.factories import parameter_gradients, random_batch

GLOBAL_BATCH = 16


def reference_loss(images, texts, scale, bias):
    """Zhai et al.'s definition, literally: labels +1 on the diagonal, -1 elsewhere, summed, / images."""
    labels = 2 * torch.eye(len(images), len(texts), dtype=images.dtype) - 1
    logits = scale * images @ texts.T + bias
    return -F.logsigmoid(labels * logits).sum() / len(images)


def _features(rows: int, dim: int = 32, seed: int = 0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(rows, dim, generator=generator, dtype=dtype), dim=-1) for _ in range(2)]


@pytest.mark.parametrize("scale, bias", [(10.0, -10.0), (3.7, 0.4)])
def test_loss_and_gradients_match_the_papers_formula_in_float64(scale, bias):
    images, texts = (f.requires_grad_() for f in _features(12))
    parameters = [torch.tensor(scale, dtype=torch.float64, requires_grad=True),
                  torch.tensor(bias, dtype=torch.float64, requires_grad=True)]
    ours = SigLipLoss()(images, texts, *parameters)
    expected = reference_loss(images, texts, *parameters)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
    inputs = [images, texts, *parameters]
    for got, want in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    shuffled = SigLipLoss()(images, texts.flip(0), *parameters)  # wrong pairs: not the same loss
    assert abs(shuffled.item() - ours.item()) > 1e-3


def test_blocks_of_other_texts_add_only_negatives():
    """Scoring the local images against extra text blocks adds the negatives' terms and nothing else."""
    images, texts = _features(6)
    others = _features(5, seed=1)[1]
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    blocked = SigLipLoss(text_blocks=lambda own: (own, others))(images, texts, scale, bias)
    full_logits = scale * images @ torch.cat([texts, others]).T + bias  # (6, 11)
    labels = -torch.ones_like(full_logits)
    labels[:, :6] += 2 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(blocked, -F.logsigmoid(labels * full_logits).sum() / 6, rtol=1e-12, atol=0)


def test_unpaired_features_are_refused():
    images, texts = _features(4)
    with pytest.raises(ValueError, match="4 images but 3 texts"):
        SigLipLoss()(images, texts[:3], torch.tensor(1.0), torch.tensor(0.0))


def test_a_siglip_model_has_the_papers_bias_and_scale_and_plain_clip_is_unchanged():
    torch.manual_seed(0)
    plain = create_model("ViT-tiny")
    torch.manual_seed(0)
    sig = CLIP(siglip_spec(get_model_spec("ViT-tiny")))
    assert plain.logit_bias is None and "logit_bias" not in plain.state_dict()
    assert sig.logit_bias.item() == -10.0 and sig.logit_bias.shape == (1,)  # 1-element for ZeRO-3
    assert math.isclose(sig.logit_scale.item(), math.log(10.0), rel_tol=1e-6)
    images, tokens = random_batch(3)
    assert len(plain(images, tokens)) == 3
    image_features, text_features, scale, bias = sig(images, tokens)
    assert bias.shape == () and math.isclose(scale.item(), 10.0, rel_tol=1e-6)
    assert torch.equal(image_features, plain(images, tokens)[0])  # only the logit parameters differ
    loss = SigLipLoss()(image_features, text_features, scale, bias)
    loss.backward()
    assert float(sig.logit_bias.grad.abs()) > 0 and float(sig.logit_scale.grad.abs()) > 0
    no_decay = weight_decay_groups(sig, 0.2)[1]["params"]
    assert any(p is sig.logit_bias for p in no_decay)


def test_the_export_carries_the_bias_and_reloads_as_a_siglip_model(tmp_path):
    torch.manual_seed(0)
    sig = CLIP(siglip_spec(get_model_spec("ViT-tiny")))
    with torch.no_grad():
        sig.logit_bias.fill_(-7.25)
    state = sig.openai_state_dict()
    plain_keys = set(create_model("ViT-tiny").openai_state_dict())
    assert set(state) - plain_keys == {"logit_bias"} and state["logit_bias"].shape == ()
    torch.save(state, tmp_path / "siglip.pt")
    loaded = load_openai_checkpoint(tmp_path / "siglip.pt")
    assert loaded.spec == sig.spec
    for key, value in loaded.openai_state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(RuntimeError, match="Unexpected key.*logit_bias"):
        create_model("ViT-tiny").load_openai_state_dict(state)  # a CLIP model has nowhere to put the bias
    fine_tune = CLIP(siglip_spec(get_model_spec("ViT-tiny")))
    fine_tune.load_openai_state_dict(create_model("ViT-tiny").openai_state_dict())  # CLIP weights, no bias
    assert fine_tune.logit_bias.item() == -10.0


def _sizes(world_size: int) -> list[int]:
    return [len(part) for part in torch.arange(GLOBAL_BATCH).tensor_split(world_size)]


def _siglip_model():
    torch.manual_seed(0)
    return CLIP(siglip_spec(get_model_spec("ViT-tiny")))


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        sizes = _sizes(world_size)
        mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        weight = world_size * sizes[rank] / GLOBAL_BATCH  # the CLIP step's loss_weight for unequal shares
        loss_fn = SigLipLoss(text_blocks=ring_text_blocks)

        images, texts = (f[mine].clone().requires_grad_() for f in _features(GLOBAL_BATCH))
        scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
        feature_loss = loss_fn(images, texts, scale, bias) * weight
        feature_loss.backward()
        feature = {"loss": feature_loss.detach(), "images": images.grad, "texts": texts.grad,
                   "scale": scale.grad, "bias": bias.grad}

        model = _siglip_model()
        batch_images, tokens = random_batch(GLOBAL_BATCH, seed=3, lengths=(4, 11))
        loss = loss_fn(*model(batch_images[mine], tokens[mine])) * weight
        loss.backward()
        grads = parameter_gradients(model)
        for grad in grads.values():  # data-parallel averaging, as DeepSpeed does
            dist.all_reduce(grad)
            grad /= world_size
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        torch.save({"feature": feature, "loss": mean_loss / world_size, "grads": grads},
                   os.path.join(out_dir, f"world{world_size}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process_reference():
    images, texts = (f.requires_grad_() for f in _features(GLOBAL_BATCH))
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    feature_loss = reference_loss(images, texts, scale, bias)
    feature_loss.backward()
    model = _siglip_model()
    batch_images, tokens = random_batch(GLOBAL_BATCH, seed=3, lengths=(4, 11))
    loss = SigLipLoss()(*model(batch_images, tokens))
    loss.backward()
    return (feature_loss.detach(), images.grad, texts.grad, scale.grad, bias.grad), loss.detach(), parameter_gradients(model)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_exchange_reproduces_the_global_batch_loss_and_gradients(world_size, tmp_path):
    """3 processes hold 6, 5 and 5 rows: the ring carries blocks of unequal size."""
    mp.spawn(_worker, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    (feature_loss, image_grad, text_grad, scale_grad, bias_grad), loss, reference = _single_process_reference()
    results = [torch.load(tmp_path / f"world{world_size}-rank{rank}.pt") for rank in range(world_size)]
    # float64 features: the mean over ranks of the losses, and the averaged gradients, to round-off
    features = [result["feature"] for result in results]
    torch.testing.assert_close(sum(f["loss"] for f in features) / world_size, feature_loss, rtol=1e-12, atol=0)
    for key, want in (("scale", scale_grad), ("bias", bias_grad)):
        torch.testing.assert_close(sum(f[key] for f in features) / world_size, want, rtol=1e-10, atol=1e-13)
    for key, want in (("images", image_grad), ("texts", text_grad)):  # each rank's rows; its texts travelled
        got = torch.cat([f[key] for f in features]) / world_size
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13, msg=key)
    assert _sizes(world_size) == [len(f["texts"]) for f in features]
    # the whole ViT-tiny model in float32, gradients averaged over ranks as DeepSpeed does
    assert "logit_bias" in reference and "visual.conv1.weight" in reference
    for result in results:
        torch.testing.assert_close(result["loss"], loss, rtol=1e-5, atol=1e-6)
        assert result["grads"].keys() == reference.keys()
        for name, grad in reference.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
