"""Exports read through OpenAI's ``clip`` package and open_clip compute exactly what rayclip computes.

Both loaders rebuild a model from weight shapes alone and give it QuickGELU and one attention head per
64 channels (ResNet attention pool: width * 32 / 64). A head count off that rule loads without an error
and computes something else, so every registered architecture must follow it.

Both loaders also cast the weights to float16 (OpenAI's checkpoints are float16) before the CPU
``.float()``. The test models' weights are made float16-representable first, so that cast is exact and
the raw (unnormalised) features can be compared to float32 round-off.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
import types

import open_clip
import packaging.version
import pytest
import torch

from models import CLIP, PAPER_MODELS, create_model, get_model_spec, get_tokenizer
from models.spec import ModelSpec

CAPTIONS = ["a photo of a t-shirt/top.", "a photo of an ankle boot.", "A Diagram: 2 cats & 1 dog, 2021!"]
OLD_DEBUG_HEADS = {"RN-tiny": (8, 4), "ViT-tiny": (4, 4)}  # (vision, text): 16-wide heads before the rule

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # both loaders try it


@pytest.fixture(scope="module")
def clip_package():
    """OpenAI's ``clip``. Its ``clip.py`` takes ``packaging`` from ``pkg_resources``, gone in setuptools >= 81."""
    with pytest.MonkeyPatch.context() as patch:
        if importlib.util.find_spec("pkg_resources") is None:
            patch.setitem(sys.modules, "pkg_resources", types.SimpleNamespace(packaging=packaging))
        return importlib.import_module("clip")


def load_with_clip(clip_package, path) -> torch.nn.Module:
    """``clip.load(path, device="cpu", jit=False)``, with the file handle rewound after the JIT attempt.

    openai-clip 1.0.1 tries ``torch.jit.load`` on the open file, which reads it to the end, then
    ``torch.load`` on the same handle: every plain state-dict file fails with EOFError (openai/CLIP#396;
    the rewind is the unmerged fix #462).
    """
    jit_load = torch.jit.load

    def jit_load_then_rewind(file, *args, **kwargs):
        start = file.tell()
        try:
            return jit_load(file, *args, **kwargs)
        except RuntimeError:
            file.seek(start)
            raise

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.jit, "load", jit_load_then_rewind)
        model, _ = clip_package.load(str(path), device="cpu", jit=False)
    return model.eval()


def load_with_open_clip(path) -> torch.nn.Module:
    model = open_clip.load_openai_model(str(path), device="cpu")  # fp32 on CPU, quick_gelu=True
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    return model.eval()


def exportable_model(spec: ModelSpec) -> CLIP:
    """A seeded model with float16-representable weights and non-trivial BatchNorm.

    OpenAI's initialisation zeroes every bottleneck's ``bn3`` gain, which would hide a wrong residual branch.
    """
    torch.manual_seed(0)
    model = CLIP(spec).eval()
    with torch.no_grad():
        for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if key.endswith("running_mean"):
                tensor.normal_(0, 0.1)
            elif key.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif key.endswith("bn3.weight"):
                tensor.normal_(1, 0.1)
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return model


def old_debug_spec(name: str) -> ModelSpec:
    spec = get_model_spec(name)
    vision_heads, text_heads = OLD_DEBUG_HEADS[name]
    return dataclasses.replace(
        spec,
        vision=dataclasses.replace(spec.vision, heads=vision_heads),
        text=dataclasses.replace(spec.text, heads=text_heads),
    )


def export(model: CLIP, path) -> None:
    torch.save(model.openai_state_dict(), path)


def features(model, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"image": model.encode_image(images), "text": model.encode_text(tokens)}


def test_clip_load_fails_on_state_dict_files_without_the_rewind(clip_package, tmp_path):
    """Why :func:`load_with_clip` rewinds; when this fails, openai-clip has fixed #396 and the rewind can go."""
    path = tmp_path / "openai_model.pt"
    export(create_model("ViT-tiny"), path)
    with pytest.raises(EOFError):
        clip_package.load(str(path), device="cpu", jit=False)


def test_clip_tokenize_gives_rayclips_ids(clip_package):
    assert torch.equal(clip_package.tokenize(CAPTIONS).long(), get_tokenizer()(CAPTIONS))


@pytest.mark.parametrize("name", ["RN-tiny", "ViT-tiny", "RN50", "ViT-B/32"])
def test_both_loaders_compute_rayclips_features(clip_package, name, tmp_path):
    model = exportable_model(get_model_spec(name))
    path = tmp_path / "openai_model.pt"
    export(model, path)
    images = torch.randn(2, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1))
    ours = features(model, images, get_tokenizer()(CAPTIONS))
    del model
    loaders = {"clip.load": lambda: load_with_clip(clip_package, path), "open_clip": lambda: load_with_open_clip(path)}
    for loader, load in loaders.items():  # one loaded copy at a time: ViT-B/32 is 151M parameters
        theirs = features(load(), images, clip_package.tokenize(CAPTIONS))
        for kind, expected in ours.items():
            scale = expected.abs().max().item()
            torch.testing.assert_close(
                theirs[kind], expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{loader}, {kind} features: {m}"
            )


def test_clip_load_computes_other_features_when_heads_break_the_rule(clip_package, tmp_path):
    """The parity check above can fail: the old ViT-tiny (16-wide heads) loads silently and computes other features."""
    spec = old_debug_spec("ViT-tiny")
    model = exportable_model(spec)
    path = tmp_path / "openai_model.pt"
    export(model, path)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = features(model, images, get_tokenizer()(CAPTIONS))
    theirs = features(load_with_clip(clip_package, path), images, clip_package.tokenize(CAPTIONS))
    for kind in ("image", "text"):
        assert not torch.allclose(theirs[kind], ours[kind], rtol=1e-2, atol=1e-2 * ours[kind].abs().max().item())


def registered_hyperparameters(spec: ModelSpec) -> dict:
    return {"embed_dim": spec.embed_dim, "vision": dataclasses.asdict(spec.vision), "text": dataclasses.asdict(spec.text)}


def openai_inferred_hyperparameters(clip_package, spec: ModelSpec) -> dict:
    """What OpenAI's ``build_model`` makes of weights shaped like ``spec``'s, read off the model it builds.

    Built on the meta device from a meta state dict: shapes only, so the 623M-parameter RN50x64 costs nothing.
    """
    with torch.device("meta"):
        model = clip_package.model.build_model(CLIP(spec).openai_state_dict())
    visual = model.visual
    if isinstance(visual, clip_package.model.VisionTransformer):
        vision = {
            "kind": "vit",
            "image_size": visual.input_resolution,
            "width": visual.transformer.width,
            "layers": visual.transformer.layers,
            "heads": visual.transformer.resblocks[0].attn.num_heads,
            "patch_size": visual.conv1.kernel_size[0],
        }
    else:
        vision = {
            "kind": "resnet",
            "image_size": visual.input_resolution,
            "width": visual.layer1[0].conv1.out_channels,
            "layers": tuple(len(getattr(visual, f"layer{stage}")) for stage in range(1, 5)),
            "heads": visual.attnpool.num_heads,
            "patch_size": None,
        }
    text = {
        "width": model.transformer.width,
        "layers": model.transformer.layers,
        "heads": model.transformer.resblocks[0].attn.num_heads,
        "context_length": model.context_length,
        "vocab_size": model.vocab_size,
    }
    return {"embed_dim": model.text_projection.shape[1], "vision": vision, "text": text}


@pytest.mark.parametrize("name", [*PAPER_MODELS, "RN-tiny", "ViT-tiny"])
def test_openai_build_model_infers_the_registered_architecture(clip_package, name):
    spec = get_model_spec(name)
    assert spec.quick_gelu, "OpenAI's model has QuickGELU only"
    assert openai_inferred_hyperparameters(clip_package, spec) == registered_hyperparameters(spec)


@pytest.mark.parametrize("name", ["RN-tiny", "ViT-tiny"])
def test_architecture_check_fails_for_the_old_debug_heads(clip_package, name):
    old = old_debug_spec(name)
    inferred = openai_inferred_hyperparameters(clip_package, old)
    assert inferred != registered_hyperparameters(old)
    assert inferred == registered_hyperparameters(get_model_spec(name))  # the same weights, other heads
