"""Tower locking: which parameters each lock freezes, BatchNorm statistics, and a real DeepSpeed step.

The DeepSpeed part runs ZeRO 1, 2 and 3 in one gloo process (a subprocess: DeepSpeed's process group must not
outlive the test): with ``lock_image`` two optimizer steps leave the image tower bit-identical, move the text
tower, and the Adam moments cover exactly the trainable parameters (the text tower and the temperature).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models import (
    CLIP,
    count_parameters,
    create_model,
    get_model_spec,
    lock_tower,
    siglip_spec,
    tower_blocks,
    tower_parameters,
    weight_decay_groups,
)
from tests.factories import random_batch

REPO_ROOT = Path(__file__).resolve().parents[2]


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def _names_under(model: nn.Module, *prefixes: str) -> set[str]:
    return {name for name, _ in model.named_parameters() if name.startswith(prefixes)}


@pytest.mark.parametrize("name", ["ViT-tiny", "RN-tiny"])
def test_the_towers_split_the_model_apart_from_its_logit_parameters(name):
    model = CLIP(siglip_spec(get_model_spec(name)))
    image, text = set(tower_parameters(model, "image")), set(tower_parameters(model, "text"))
    assert image and text and not image & text
    assert set(dict(model.named_parameters())) - image - text == {"logit_scale", "logit_bias"}
    assert all(name.startswith("visual.") for name in image)


def test_a_locked_tower_freezes_only_itself_and_never_the_temperature():
    model = create_model("ViT-tiny")
    lock_tower(model, "image")
    assert _trainable(model) == set(tower_parameters(model, "text")) | {"logit_scale"}
    lock_tower(model, "text")
    assert _trainable(model) == {"logit_scale"}
    counts = count_parameters(model)
    assert counts.trainable == {"image": 0, "text": 0, "logit": 1}
    assert counts.total_frozen == sum(p.numel() for p in model.parameters()) - 1
    groups = weight_decay_groups(model, 0.2)
    assert [len(group["params"]) for group in groups] == [0, 1]  # only the temperature reaches the optimizer


def test_unlocked_layers_leave_the_last_blocks_and_the_head_trainable():
    model = create_model("ViT-tiny")  # 2 blocks per tower
    lock_tower(model, "image", unlocked_layers=1)
    lock_tower(model, "text", unlocked_layers=1)
    expected = _names_under(model, "visual.transformer.resblocks.1.", "visual.ln_post.", "visual.proj",
                            "transformer.resblocks.1.", "ln_final.", "text_projection", "logit_scale")
    assert _trainable(model) == expected
    lock_tower(model, "text", unlocked_layers=2)  # every block: the embeddings still stay locked
    assert not {"token_embedding.weight", "positional_embedding"} & _trainable(model)
    assert _names_under(model, "transformer.resblocks.0.") <= _trainable(model)


@pytest.mark.parametrize("unlocked, trained", [(0, ()), (1, ("visual.attnpool.",)),
                                               (2, ("visual.layer4.", "visual.attnpool."))])
def test_resnet_stages_count_as_blocks_and_the_attention_pool_as_the_last(unlocked, trained):
    model = create_model("RN-tiny")
    assert len(tower_blocks(model, "image")[0]) == 5
    lock_tower(model, "image", unlocked_layers=unlocked)
    assert _trainable(model) & set(tower_parameters(model, "image")) == _names_under(model, *trained)


def test_an_impossible_unlocked_count_is_refused():
    with pytest.raises(ValueError, match="has 2 blocks; allowed: 0..2"):
        lock_tower(create_model("ViT-tiny"), "text", unlocked_layers=3)


def test_lock_norm_params_freezes_the_norms_inside_unlocked_blocks():
    model = create_model("ViT-tiny")
    lock_tower(model, "image", unlocked_layers=1, norm_params=True)
    trainable = _trainable(model)
    block = "visual.transformer.resblocks.1."
    assert not _names_under(model, block + "ln_1.", block + "ln_2.", "visual.ln_post.") & trainable
    assert {block + "attn.in_proj_weight", block + "mlp.c_fc.weight", "visual.proj"} <= trainable


def _batch_norm_statistics(model: CLIP) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.visual.state_dict().items() if "running" in name}


@pytest.mark.parametrize("norm_stats", [True, False])
def test_locked_batch_norm_keeps_its_statistics_in_training_mode(norm_stats):
    torch.manual_seed(0)
    model = create_model("RN-tiny")
    lock_tower(model, "image", unlocked_layers=1, norm_stats=norm_stats)  # the pool trains, every BN is locked
    images, _ = random_batch(4, image_size=64)
    before = _batch_norm_statistics(model)
    evaluated = model.eval().encode_image(images)
    trained = model.train().encode_image(images)
    after = _batch_norm_statistics(model)
    if norm_stats:
        assert all(torch.equal(before[name], after[name]) for name in before)
        torch.testing.assert_close(trained, evaluated, rtol=0, atol=0)
        assert model.training and model.visual.training  # only the locked BatchNorms normalise as in evaluation
    else:
        assert not torch.equal(before["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])


def test_deepspeed_zero_1_2_3_train_the_text_tower_against_a_locked_image_tower(tmp_path):
    from harness.local_servers import free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, __file__, str(tmp_path / "out.json")], env=env, cwd=REPO_ROOT,
                         timeout=600, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    for stage, outcome in json.loads((tmp_path / "out.json").read_text()).items():
        assert outcome["image_unchanged"] and outcome["text_changed"], (stage, outcome)
        assert outcome["frozen"] == outcome["image_parameters"], stage
        # Adam's two moments cover the trainable parameters (text tower + temperature), at most alignment padding
        trainable = outcome["trainable"]
        assert trainable <= outcome["adam_moment_elements"] // 2 <= trainable + 64, (stage, outcome)


def _zero_stage_outcome(zero_stage: int) -> dict:
    from models import ClipLoss
    from orchestrator.collectives import all_reduce_sum, gather_with_grad
    from orchestrator.config import load_config
    from orchestrator.train import (
        build_engine,
        build_model,
        export_openai_state_dict,
        single_chunk_step,
    )

    cfg = load_config(overrides=[f"deepspeed.zero_stage={zero_stage}", "deepspeed.micro_batch_size=8",
                                 "deepspeed.precision=fp32", "model.lock_image=true", "optim.lr=1e-2",
                                 "schedule.warmup_steps=0"])
    model = build_model(cfg)
    start = {name: value.clone() for name, value in model.state_dict().items()}
    counts = count_parameters(model)
    engine = build_engine(cfg, model, world_size=1)

    def backward(loss):
        engine.backward(loss)
        engine.step()

    images, tokens = random_batch(8, seed=1)
    for _ in range(2):
        result = single_chunk_step(engine, images, tokens, loss=ClipLoss(gather_with_grad), backward=backward,
                                   all_reduce=all_reduce_sum)
        assert result.finite
    exported = export_openai_state_dict(engine, zero_stage)
    image_names = [name for name in start if name.startswith("visual.")]
    moments = sum(state[key].numel() for state in engine.optimizer.optimizer.state.values()
                  for key in ("exp_avg", "exp_avg_sq") if key in state)
    return {
        "image_unchanged": all(torch.equal(exported[name], start[name]) for name in image_names),
        "text_changed": not torch.equal(exported["text_projection"], start["text_projection"]),
        "trainable": counts.total_trainable,
        "frozen": counts.total_frozen,
        "image_parameters": counts.frozen["image"] + counts.trainable["image"],
        "adam_moment_elements": moments,
    }


if __name__ == "__main__":
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    Path(sys.argv[1]).write_text(json.dumps({stage: _zero_stage_outcome(stage) for stage in (1, 2, 3)}))
