"""``model.init_from``: only the configured towers load (the temperature with both), and a file of another
architecture is refused naming the field and what the file holds."""

from __future__ import annotations

import pytest
import torch

from models import create_model, tower_parameters
from orchestrator.config import load_config
from orchestrator.train import build_model, check_initial_weights, load_initial_weights


@pytest.fixture
def source_file(tmp_path):
    torch.manual_seed(123)
    source = create_model("ViT-tiny")
    with torch.no_grad():
        source.logit_scale.fill_(3.0)
    path = tmp_path / "source.pt"
    torch.save(source.openai_state_dict(), path)
    return path, source.state_dict()


@pytest.mark.parametrize("towers", [["image"], ["text"], ["image", "text"]])
def test_only_the_configured_towers_load(source_file, towers):
    path, source = source_file
    cfg = load_config(None, [f"model.init_from={path}", f"model.init_towers=[{','.join(towers)}]"])
    fresh = build_model(load_config()).state_dict()
    model = build_model(cfg)
    loaded = model.state_dict()
    for tower in ("image", "text"):
        expected = source if tower in towers else fresh
        assert all(torch.equal(loaded[name], expected[name]) for name in tower_parameters(model, tower)), tower
    assert torch.equal(loaded["logit_scale"], (source if len(towers) == 2 else fresh)["logit_scale"])


def test_another_architecture_is_refused_naming_the_field(source_file):
    path, _ = source_file
    cfg = load_config(None, ["model.name=RN-tiny", f"model.init_from={path}"])
    expected = f"model.init_from={str(path)!r} holds ViT-tiny (ViT 2 x 64, patch 4, 32 px;"
    with pytest.raises(ValueError, match=r"model\.name='RN-tiny' is RN-tiny \(ResNet 1-1-1-1") as error:
        check_initial_weights(cfg)
    assert str(error.value).startswith(expected)
    with pytest.raises(ValueError, match="holds ViT-tiny"):
        load_initial_weights(create_model("RN-tiny"), cfg)


def test_a_missing_source_is_named(tmp_path):
    cfg = load_config(None, [f"model.init_from={tmp_path / 'nope.pt'}"])
    with pytest.raises(ValueError, match=r"^model\.init_from '.*nope\.pt': not a file"):
        check_initial_weights(cfg)
