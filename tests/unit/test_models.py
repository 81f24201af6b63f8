"""The model zoo against DESIGN.md's reference counts and OpenAI's reference implementation."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import PAPER_MODELS, CLIP, create_model, get_model_spec, list_models
from models.flops import forward_flops
from models.openai_checkpoint import load_openai_checkpoint, spec_from_openai_state_dict
from tests.reference import openai_clip_module

REFERENCE_PARAMETER_COUNTS = {
    "RN50": 102_007_137,
    "RN101": 119_688_033,
    "RN50x4": 178_300_601,
    "RN50x16": 290_979_217,
    "RN50x64": 623_258_305,
    "ViT-B/32": 151_277_313,
    "ViT-B/16": 149_620_737,
    "ViT-L/14": 427_616_513,
    "ViT-L/14@336px": 427_944_193,
}


def meta_model(name: str) -> CLIP:
    with torch.device("meta"):
        return create_model(name)


def reference_meta_model(name: str):
    """OpenAI's ``CLIP`` class with the same hyperparameters, built on the meta device."""
    spec = get_model_spec(name)
    vision = spec.vision
    with torch.device("meta"):
        return openai_clip_module("model").CLIP(
            embed_dim=spec.embed_dim,
            image_resolution=vision.image_size,
            vision_layers=vision.layers,
            vision_width=vision.width,
            vision_patch_size=vision.patch_size,
            context_length=spec.text.context_length,
            vocab_size=spec.text.vocab_size,
            transformer_width=spec.text.width,
            transformer_heads=spec.text.heads,
            transformer_layers=spec.text.layers,
        )


def test_registry_lists_the_nine_paper_architectures_first():
    assert list_models()[:9] == list(PAPER_MODELS)
    assert {"RN-tiny", "ViT-tiny"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'ViT-H/14'.*ViT-B/32"):
        create_model("ViT-H/14")


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_parameter_count_equals_the_reference(name):
    assert sum(p.numel() for p in meta_model(name).parameters()) == REFERENCE_PARAMETER_COUNTS[name]


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_state_dict_keys_and_shapes_equal_openais(name):
    ours = {key: tuple(value.shape) for key, value in meta_model(name).openai_state_dict().items()}
    theirs = {key: tuple(value.shape) for key, value in reference_meta_model(name).state_dict().items()}
    assert ours == theirs


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_architecture_is_inferred_from_openai_weights(name):
    state = reference_meta_model(name).state_dict()
    assert spec_from_openai_state_dict(state) == get_model_spec(name)


def _randomise_batchnorm(model: CLIP) -> None:
    """Non-trivial BN statistics and gains, so the parity check exercises every ResNet path."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in list(model.named_buffers()) + list(model.named_parameters()):
            if name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("bn3.weight"):
                tensor.copy_(1 + torch.randn(tensor.shape, generator=generator) * 0.1)


def _sample_tokens() -> torch.Tensor:
    tokens = torch.zeros(3, 77, dtype=torch.long)
    tokens[0, :5] = torch.tensor([49406, 320, 1929, 530, 49407])
    tokens[1, :3] = torch.tensor([49406, 320, 49407])
    tokens[2, :12] = torch.tensor([49406, *range(1000, 1010), 49407])
    return tokens


@pytest.mark.parametrize("name", ["RN50", "RN50x4", "ViT-B/32", "ViT-B/16"])
def test_features_equal_openais_reference_implementation(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    _randomise_batchnorm(model)
    state = model.openai_state_dict()
    reference = openai_clip_module("model").build_model({k: v.clone() for k, v in state.items()}).float().eval()
    reference.load_state_dict(state)
    images = torch.randn(2, 3, model.image_size, model.image_size)
    tokens = _sample_tokens()
    with torch.no_grad():
        for ours, theirs in (
            (model.encode_image(images), reference.encode_image(images)),
            (model.encode_text(tokens), reference.encode_text(tokens)),
        ):
            assert ours.shape == theirs.shape
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())


def test_openai_round_trip_is_exact_and_logit_scale_is_a_scalar():
    model = create_model("RN-tiny")
    state = model.openai_state_dict()
    assert state["logit_scale"].shape == ()
    assert model.logit_scale.shape == (1,)  # DeepSpeed ZeRO-3 rejects 0-dim parameters
    copy = create_model("RN-tiny")
    copy.load_openai_state_dict({**state, "input_resolution": torch.tensor(64), "context_length": torch.tensor(77)})
    for key, value in copy.openai_state_dict().items():
        assert torch.equal(value, state[key]), key
    plain = create_model("RN-tiny")
    plain.load_state_dict(state, strict=True)  # a released checkpoint loads with plain load_state_dict too
    assert torch.equal(plain.logit_scale, model.logit_scale)


def test_loading_wrong_weights_names_the_problem():
    model = create_model("ViT-tiny")
    state = model.openai_state_dict()
    bad_shape = {**state, "text_projection": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"text_projection: checkpoint \(3, 3\) vs model \(64, 64\)"):
        model.load_openai_state_dict(bad_shape)
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_openai_state_dict({k: v for k, v in state.items() if k != "ln_final.weight"})
    with pytest.raises(ValueError, match="input_resolution=224 but ViT-tiny has 32"):
        model.load_openai_state_dict({**state, "input_resolution": torch.tensor(224)})


def test_load_openai_checkpoint_from_a_file(tmp_path):
    model = create_model("ViT-B/32")
    path = tmp_path / "vit_b32.pt"
    torch.save(model.openai_state_dict(), path)
    loaded = load_openai_checkpoint(path)
    assert loaded.spec.name == "ViT-B/32"
    assert torch.equal(loaded.visual.proj, model.visual.proj)


def test_forward_returns_normalised_features_and_clamped_scale():
    model = create_model("ViT-tiny")
    images = torch.randn(4, 3, 32, 32)
    tokens = _sample_tokens()[[0, 1, 2, 0]]
    image_features, text_features, scale = model(images, tokens)
    assert image_features.shape == text_features.shape == (4, 64)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(4))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model(images, tokens)[2].item() == 100.0
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100))


def test_text_tower_ignores_tokens_after_the_last_eos():
    """Trimming to the longest caption is exact: padding length and garbage after [EOS] change nothing."""
    model = create_model("ViT-tiny").eval()
    tokens = _sample_tokens()
    garbage = tokens.clone()
    garbage[:, 20:] = torch.randint(1, 40000, (3, 57))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), model.encode_text(garbage), rtol=0, atol=0)
        torch.testing.assert_close(model.encode_text(tokens), model.encode_text(tokens[:, :40]), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["RN-tiny", "ViT-tiny"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = create_model(name).eval()  # eval: BN statistics must not move between the two passes
    images = torch.randn(2, 3, model.image_size, model.image_size)
    tokens = _sample_tokens()[:2]

    def gradients():
        model.zero_grad()
        image_features, text_features, scale = model(images, tokens)
        (scale * image_features @ text_features.T).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.set_grad_checkpointing(vision=True, text=True)
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-7)


def test_forward_flops_match_the_published_vit_b32_figure():
    image, text = forward_flops(get_model_spec("ViT-B/32"))
    assert (image + text) / 1e9 == pytest.approx(14.8, abs=0.05)  # DESIGN.md: 14.8 GFLOPs per pair
    assert forward_flops(get_model_spec("RN50x64"))[0] > 40 * forward_flops(get_model_spec("RN50"))[0]


def test_spec_validation_names_the_field():
    from models.spec import ModelSpec, TextSpec, VisionSpec

    with pytest.raises(ValueError, match="vision.layers as four stage depths"):
        ModelSpec(
            name="bad",
            embed_dim=8,
            vision=VisionSpec(kind="resnet", image_size=64, width=8, layers=(1, 1), heads=1),
            text=TextSpec(width=8, layers=1, heads=1),
        )
    spec = get_model_spec("ViT-B/16", image_size=384, quick_gelu=False)
    assert (spec.vision.image_size, spec.quick_gelu) == (384, False)
    assert ModelSpec.from_dict(spec.to_dict()) == spec


FORBIDDEN_IN_MODELS = ("ray", "deepspeed", "mlflow", "boto3", "torch.distributed")


def test_models_package_never_imports_distributed_or_cluster_code():
    """STYLE.md #1: model code is single-device; distribution is applied from orchestrator/."""
    package = Path(__file__).resolve().parents[2] / "models"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN_IN_MODELS), (
                    f"{path.name} imports {name}"
                )
    code = (
        "import sys, models, models.tokenizer, models.loss, models.zero_shot, models.transforms, models.flops;"
        "bad = [m for m in ('ray', 'deepspeed', 'mlflow', 'boto3') if m in sys.modules]; print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=package.parent)


@pytest.mark.parametrize("name", ["RN-tiny", "ViT-tiny"])
def test_debug_size_checkpoints_reload_with_their_own_head_counts(name, tmp_path):
    """Heads are invisible in weight shapes: a registered match must supply them, or features change."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    path = tmp_path / "export.pt"
    torch.save(model.openai_state_dict(), path)
    loaded = load_openai_checkpoint(path).eval()
    assert loaded.spec == model.spec
    images = torch.randn(2, 3, model.image_size, model.image_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images))
        torch.testing.assert_close(loaded.encode_text(_sample_tokens()), model.encode_text(_sample_tokens()))
