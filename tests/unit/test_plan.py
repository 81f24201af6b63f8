"""The run planner's arithmetic: how each memory term scales, what the search returns, and the job's flags.

Activation bytes are checked against what autograd really saves for rayclip's modules; the H100 peaks
measured by ``benchmarks/gpu_step.py`` are checked against the prediction for the same step.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from jobs.plan import main as plan_main
from models import CLIP, get_model_spec
from orchestrator.config import RunConfig
from orchestrator.plan import (
    GPU_TYPES,
    GIB,
    StepShape,
    checkpoint_cost,
    choose_micro_batch,
    estimate_memory,
    get_gpu_type,
    largest_micro_batch,
    measured_mfu,
    memory_problems,
    parameter_counts,
    rank_bytes,
    shape_for,
)
from orchestrator.plan.activations import Widths, image_tower, text_tower
from orchestrator.plan.timing import MEASUREMENTS


def _shape(name: str = "ViT-L/14", **changes) -> StepShape:
    shape = StepShape(spec=get_model_spec(name), world_size=8, zero_stage=1, precision="autocast", micro_batch=64,
                      worker_batch=64, global_batch=512, grad_checkpointing=False)
    return dataclasses.replace(shape, **changes)


def _terms(**changes) -> dict[str, int]:
    return estimate_memory(_shape(**changes)).terms


@pytest.mark.parametrize("stage, sharded, whole", [
    (1, ["optimizer state"], ["parameters"]),
    (2, ["gradients", "optimizer state"], ["parameters"]),
    (3, ["parameters", "gradients", "optimizer state"], []),
])
def test_zero_stages_shard_what_they_must(stage, sharded, whole):
    four, eight = _terms(zero_stage=stage, world_size=4), _terms(zero_stage=stage, world_size=8)
    for term in sharded:
        assert eight[term] == pytest.approx(four[term] / 2, rel=1e-6), term
    for term in whole:
        assert eight[term] == four[term], term


def test_zero_1_keeps_full_gradients_and_zero_0_full_optimizer_state():
    p = parameter_counts(get_model_spec("ViT-L/14")).total
    zero0, zero1 = _terms(zero_stage=0), _terms(zero_stage=1)
    assert zero0["optimizer state"] == 8 * p  # Adam moments; fp32 weights need no master copy
    assert zero1["gradients"] == 4 * p + 4 * p // 8  # full fp32 gradients + the rank's fp32 partition
    assert zero1["optimizer state"] == 12 * p // 8  # master copy + moments, sharded


def test_checkpointing_lowers_activations_of_both_towers():
    for name in ("ViT-L/14", "RN50x64"):
        off, on = _terms(name=name), _terms(name=name, grad_checkpointing=True)
        for tower in ("activations: image tower", "activations: text tower"):
            assert on[tower] < off[tower] / 2, (name, tower)  # RN50x64 keeps its 448-px stem: not checkpointed


def test_logits_are_both_directions_of_local_by_global_with_gradients():
    terms = _terms(worker_batch=96, micro_batch=32, global_batch=768)
    assert terms["loss logits"] == 2 * 96 * 768 * 4 * 2


def test_activations_scale_with_the_micro_batch_and_nothing_else():
    small, large = _terms(micro_batch=16), _terms(micro_batch=32)
    assert large["activations: image tower"] == 2 * small["activations: image tower"]
    assert large["parameters"] == small["parameters"] and large["loss logits"] == small["loss logits"]


@pytest.mark.parametrize("name, checkpointing, patch_dropout", [
    ("ViT-tiny", False, 0.0), ("ViT-tiny", True, 0.0), ("RN-tiny", False, 0.0), ("RN-tiny", True, 0.0),
    ("ViT-B/32", False, 0.0), ("ViT-B/32", False, 0.5), ("ViT-tiny", True, 0.75),
])
def test_activation_bytes_match_what_autograd_saves(name, checkpointing, patch_dropout):
    """fp32 on CPU: the bytes of every distinct storage autograd saves (weights excluded) vs the formula,
    also for a training forward with FLIP's patch dropout."""
    spec = get_model_spec(name)
    torch.manual_seed(0)
    model = CLIP(spec)
    model.set_grad_checkpointing(checkpointing, checkpointing)
    model.set_patch_dropout(patch_dropout)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    rows, size = 2, spec.vision.image_size
    images = torch.randn(rows, 3, size, size)
    tokens = torch.randint(300, 5000, (rows, 77))
    tokens[:, -1] = 49407
    widths = Widths.of("fp32")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.encode_image(images)
    predicted = rows * image_tower(spec, checkpointing=checkpointing, widths=widths, patch_dropout=patch_dropout).kept
    predicted += images.nbytes
    assert sum(saved.values()) == pytest.approx(predicted, rel=0.08)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.encode_text(tokens)
    predicted = rows * text_tower(spec, 77, checkpointing=checkpointing, widths=widths).kept
    assert sum(saved.values()) == pytest.approx(predicted, rel=0.08)


def test_the_largest_micro_batch_fits_and_one_more_does_not():
    gpu = get_gpu_type("a100-40gb")
    shape = _shape(world_size=8, worker_batch=4096, global_batch=32768, micro_batch=1)
    largest = largest_micro_batch(shape, gpu)
    assert 0 < largest < 4096
    assert estimate_memory(dataclasses.replace(shape, micro_batch=largest)).total <= gpu.memory_bytes
    assert estimate_memory(dataclasses.replace(shape, micro_batch=largest + 1)).total > gpu.memory_bytes


@pytest.mark.parametrize("row", [json.loads(line) for line in MEASUREMENTS.read_text().splitlines()
                                 if '"autocast"' in line and '"compile": false' in line])
def test_the_h100_peaks_measured_by_gpu_step_are_predicted_within_20_percent(row):
    shape = StepShape(spec=get_model_spec(row["model"]), world_size=1, zero_stage=row["zero_stage"],
                      precision="autocast", micro_batch=row["batch"], worker_batch=row["batch"],
                      global_batch=row["batch"], grad_checkpointing=row["grad_checkpointing"], text_tokens=20,
                      patch_dropout=row.get("patch_dropout", 0.0))
    assert estimate_memory(shape).allocated / GIB == pytest.approx(row["peak_mem_gib"], rel=0.2)


def test_the_default_mfu_is_the_projects_measurement():
    assert measured_mfu("ViT-L/14", compiled=False).mfu == 0.189
    assert measured_mfu("ViT-L/14", compiled=True).mfu == 0.3589
    assert measured_mfu("RN101", compiled=False).mfu == 0.15


def _config(**deepspeed) -> RunConfig:
    return RunConfig.from_dict({"model": {"name": "ViT-L/14", "grad_checkpointing": False},
                                "scaling": {"num_workers": 64, "use_gpu": True},
                                "deepspeed": {"precision": "bf16", "zero_stage": 1, **deepspeed},
                                "schedule": {"warmup_steps": 10}})


def test_an_impossible_config_is_refused_naming_the_term():
    problems = memory_problems(_config(micro_batch_size=512, global_batch_size=32768), "h100")
    assert len(problems) == 1
    message = problems[0]
    assert message.startswith("activations (ViT-L/14 ViT image tower, micro_batch 512, no checkpointing) need ")
    assert "of the H100 80GB's 80 GiB at 64 workers" in message and "exceeds it by" in message
    assert "allowed: deepspeed.micro_batch_size <= " in message and "model.grad_checkpointing: true" in message
    assert memory_problems(_config(micro_batch_size=64, global_batch_size=32768), "h100") == []
    assert memory_problems(_config(micro_batch_size=512, global_batch_size=32768), None) == []  # no GPU type: unchecked


def test_elastic_worker_counts_get_a_micro_batch_that_fits():
    cfg = _config(micro_batch_size=256, global_batch_size=32768)
    gpu = get_gpu_type("a100-40gb")
    for workers in (32, 64):
        micro, chunks = choose_micro_batch(cfg, workers, "a100-40gb")
        share = 32768 // workers
        assert micro * chunks >= share and micro * (chunks - 1) < share
        shape = dataclasses.replace(_shape(world_size=workers, worker_batch=share, global_batch=32768), micro_batch=micro)
        assert estimate_memory(shape).total <= gpu.memory_bytes
    assert choose_micro_batch(cfg, 32, "a100-40gb")[1] > choose_micro_batch(cfg, 64, "a100-40gb")[1]


def test_json_holds_the_figures_the_issue_names(capsys):
    assert plan_main(["--model", "ViT-L/14", "--gpus", "256", "--gpu-type", "h100", "--global-batch", "32768",
                      "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("per_gpu_memory_gib", "micro_batch", "accumulation_chunks", "step_time_s", "samples_per_s",
                "scaling_efficiency", "days"):
        assert key in result, key
    assert result["per_gpu_memory_gib"]["total"] > result["per_gpu_memory_gib"]["activations: image tower"] > 0
    assert result["micro_batch"] * result["accumulation_chunks"] >= 128
    assert set(result["scaling_efficiency"]) == {"8", "64", "256", "1024"}


def test_the_written_config_loads_and_matches_the_plan(tmp_path, capsys):
    out = tmp_path / "run.yaml"
    assert plan_main(["--config", "configs/vit_l14.yaml", "--gpus", "64", "--gpu-type", "a100-40gb",
                      "--grad-checkpointing", "off", "--json", "--write-config", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    text = out.read_text()
    assert "ray_cluster.yaml: GPU worker nodes min_workers/max_workers = 8" in text
    cfg = RunConfig.from_dict(yaml.safe_load(text))
    assert cfg.scaling.num_workers == 64 and cfg.global_batch_size == 32768
    assert cfg.deepspeed.micro_batch_size == result["micro_batch"]
    assert cfg.accumulation_chunks(64) == result["accumulation_chunks"] > 1
    assert (cfg.deepspeed.zero_stage, cfg.model.grad_checkpointing, cfg.deepspeed.precision) == (1, False, "bf16")
    assert cfg.data.shards.startswith("s3://")  # the rest of --config is kept


@pytest.mark.parametrize("flags, message", [
    (["--zero-stage", "5"], "error: --zero-stage 5: allowed: 0, 1, 2, 3"),
    (["--precision", "fp16"], "error: --precision fp16: allowed: autocast, bf16, fp32"),
    (["--gpu-type", "v100"], "error: --gpu-type v100: allowed: a100-40gb, a100-80gb, h100, h200"),
    (["--grad-checkpointing", "yes"], "error: --grad-checkpointing yes: allowed: on, off"),
    (["--upload-gbps", "0"], "error: --upload-gbps 0.0: allowed: a positive number of GB/s"),
])
def test_a_bad_flag_exits_2_naming_it(flags, message, capsys):
    assert plan_main(["--model", "ViT-L/14", "--gpus", "8", *flags]) == 2
    err = capsys.readouterr().err
    assert err.strip() == message and "Traceback" not in err


def test_the_pretraining_job_refuses_a_config_that_cannot_fit_before_ray_starts():
    """``jobs/pretrain.py`` with the paper's ViT-L/14 at micro-batch 512 without checkpointing: exit 2, one line
    naming the term and what would fit, no traceback, and no Ray (nothing else could be this fast)."""
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    started = time.monotonic()
    run = subprocess.run([sys.executable, "jobs/pretrain.py", "--config", "configs/vit_l14.yaml",
                          "--set", "deepspeed.micro_batch_size=512", "--set", "model.grad_checkpointing=false",
                          "--set", "scaling.num_workers=64"], cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "ray" not in run.stdout.lower()
    assert run.stderr.startswith("error: the batch plan does not fit scaling.gpu_type: activations (ViT-L/14 ViT "
                                 "image tower, micro_batch 512, no checkpointing) need ")
    assert "allowed: deepspeed.micro_batch_size <= " in run.stderr and time.monotonic() - started < 60


def test_the_gpu_recipes_fit_their_gpu_and_the_config_knows_every_planned_gpu():
    import typing

    from orchestrator.config.loading import load_config
    from orchestrator.config.sections import ScalingSection

    assert set(typing.get_args(typing.get_args(ScalingSection.model_fields["gpu_type"].annotation)[0])) == set(GPU_TYPES)
    configs = Path(__file__).resolve().parents[2] / "configs"
    for recipe in ("vit_l14.yaml", "vit_l14_spot.yaml", "rn50x64.yaml"):
        cfg = load_config(configs / recipe)
        assert cfg.scaling.gpu_type == "h100" and memory_problems(cfg, None) == [], recipe


def test_one_rule_splits_a_share_into_the_fewest_chunks_spread_evenly():
    """``orchestrator.batch_split.balanced_micro_batch``: the fewest chunks of at most ``largest`` rows, the rows
    spread evenly over them. It is the rule of the worker's chunk count (``RunConfig.accumulation_chunks``) and
    of the planner's ``choose_micro_batch``: at every count of the spot recipe's range (its 128-sample
    micro-batch fits an H100 at each) both give the chunks pinned here for its 32,768 samples."""
    from orchestrator.batch_split import balanced_micro_batch, worker_shares
    from orchestrator.config.loading import load_config

    for share in range(1, 300):
        for largest in (1, 3, 64, 128):
            micro, chunks = balanced_micro_batch(share, largest)
            assert chunks == -(-share // largest) and micro <= largest, (share, largest)
            assert micro * (chunks - 1) < share <= micro * chunks and micro == -(-share // chunks), (share, largest)
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "vit_l14_spot.yaml")
    pinned = {64: (128, 4), 65: (127, 4), 100: (110, 3), 128: (128, 2), 129: (128, 2), 200: (82, 2), 255: (65, 2),
              256: (128, 1)}
    for workers, (micro, chunks) in pinned.items():
        assert balanced_micro_batch(max(worker_shares(32768, workers)), 128) == (micro, chunks), workers
        assert choose_micro_batch(cfg, workers, "h100") == (micro, chunks), workers
        assert cfg.accumulation_chunks(workers) == chunks and micro <= cfg.deepspeed.micro_batch_size, workers


def test_a_locked_tower_keeps_no_gradient_optimizer_state_or_activations():
    """LiT's locked image tower: the state terms count the trainable parameters (as ``models.lock_tower``
    leaves them), the tower keeps no activations, and its forward alone is counted in the FLOPs."""
    from models import count_parameters, lock_tower
    from models.flops import forward_flops
    from orchestrator.plan import TowerLock, train_flops_per_sample

    with torch.device("meta"):
        model = CLIP(get_model_spec("ViT-L/14"))
    lock_tower(model, "image")
    trainable = count_parameters(model).total_trainable
    locked = _shape(zero_stage=0, locks=(TowerLock("image"),))
    counts = parameter_counts(locked.spec, locked.locks)
    assert counts.trainable == trainable < counts.total / 2
    whole, lit = estimate_memory(_shape(zero_stage=0)).terms, estimate_memory(locked).terms
    assert lit["gradients"] == 4 * trainable and lit["optimizer state"] == 8 * trainable  # autocast: no fp32 master
    assert lit["parameters"] == whole["parameters"]  # locked weights are still on the GPU
    assert lit["activations: image tower"] == 0 < lit["activations: text tower"] == whole["activations: text tower"]
    assert 0 < lit["autocast weight copies"] < whole["autocast weight copies"]
    assert estimate_memory(locked).allocated < estimate_memory(_shape(zero_stage=0)).allocated
    partly = estimate_memory(_shape(zero_stage=0, locks=(TowerLock("image", unlocked_layers=2),))).terms
    assert partly["activations: image tower"] == whole["activations: image tower"]  # counted whole: an upper bound
    assert lit["optimizer state"] < partly["optimizer state"] < whole["optimizer state"]
    image, text = forward_flops(locked.spec)
    assert train_flops_per_sample((image, text), frozenset({"image"})) == image + 3 * text


def test_a_lit_config_fits_where_the_same_run_unlocked_does_not(tmp_path, capsys):
    """The pretraining job's check and ``jobs/plan.py`` read ``model.lock_image`` from the config; the plan's
    ``--write-config`` keeps the lock, and ``--lock image`` plans it without a config."""
    def config(lock: bool) -> RunConfig:
        return RunConfig.from_dict({"model": {"name": "ViT-L/14", "grad_checkpointing": False, "lock_image": lock},
                                    "scaling": {"num_workers": 64, "use_gpu": True, "gpu_type": "a100-40gb"},
                                    "deepspeed": {"precision": "bf16", "zero_stage": 0, "micro_batch_size": 160,
                                                  "global_batch_size": 10240},
                                    "schedule": {"warmup_steps": 10}})
    assert memory_problems(config(False), None) and memory_problems(config(True), None) == []
    assert plan_main(["--model", "ViT-L/14", "--gpus", "64", "--lock", "image", "--json"]) == 0
    locked = json.loads(capsys.readouterr().out)
    assert plan_main(["--model", "ViT-L/14", "--gpus", "64", "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert locked["locked"] == ["image"] and locked["trainable_parameters"] < whole["trainable_parameters"]
    assert locked["step_time_s"] < whole["step_time_s"]
    out = tmp_path / "lit.yaml"
    assert plan_main(["--config", "configs/lit_vit_b32.yaml", "--gpus", "16", "--write-config", str(out)]) == 0
    assert "locked: image" in capsys.readouterr().out
    assert RunConfig.from_dict(yaml.safe_load(out.read_text())).model.lock_image
    assert plan_main(["--model", "ViT-L/14", "--gpus", "8", "--lock", "vision"]) == 2
    assert capsys.readouterr().err.strip() == "error: --lock vision: allowed: image, text"


def test_patch_dropout_plans_fewer_flops_and_activations_and_is_kept_in_the_written_config(tmp_path, capsys):
    """FLIP: the image tower's FLOPs (counted on the kept tokens) and activations fall, so the step is shorter
    and a larger micro-batch fits; the pretraining job's check reads ``model.patch_dropout``; ResNets refuse it."""
    from models.flops import forward_flops

    spec = get_model_spec("ViT-L/14")
    assert forward_flops(spec, patch_dropout=0.5)[0] < 0.55 * forward_flops(spec)[0]
    assert forward_flops(spec, patch_dropout=0.5)[1] == forward_flops(spec)[1]
    terms, dropped = _terms(), _terms(patch_dropout=0.5)
    assert 0.45 < dropped["activations: image tower"] / terms["activations: image tower"] < 0.55
    assert dropped["activations: text tower"] == terms["activations: text tower"]
    results = {}
    for share in ("0", "0.5"):
        assert plan_main(["--model", "ViT-L/14", "--gpus", "256", "--gpu-type", "a100-40gb", "--grad-checkpointing",
                          "off", "--global-batch", "131072", "--patch-dropout", share, "--json"]) == 0
        results[share] = json.loads(capsys.readouterr().out)
    assert results["0.5"]["step_time_s"] < 0.75 * results["0"]["step_time_s"]
    fits = {share: next(f for f in r["gpu_fits"] if f["gpu"] == "A100 40GB")["largest_micro_batch"]
            for share, r in results.items()}
    assert fits["0.5"] > 1.5 * fits["0"]
    cfg = _config(micro_batch_size=fits["0"] + 32, global_batch_size=32768)
    cfg.scaling.gpu_type = "a100-40gb"
    assert memory_problems(cfg, None)
    cfg.model.patch_dropout = 0.5
    assert memory_problems(cfg, None) == []
    out = tmp_path / "flip.yaml"
    assert plan_main(["--config", "configs/vit_l14.yaml", "--patch-dropout", "0.5", "--write-config", str(out)]) == 0
    assert "patch dropout 0.5" in capsys.readouterr().out
    assert RunConfig.from_dict(yaml.safe_load(out.read_text())).model.patch_dropout == 0.5
    assert plan_main(["--model", "RN50", "--gpus", "8", "--patch-dropout", "0.5"]) == 2
    assert "RN50 has a resnet image tower; allowed: 0" in capsys.readouterr().err


def test_a_checkpoint_costs_rank_0_the_whole_weights_under_zero_1_and_every_rank_one_share_under_zero_3(capsys):
    shape = shape_for(get_model_spec("ViT-L/14"), world_size=256, global_batch=32768, micro_batch=32, zero_stage=1,
                      precision="autocast", grad_checkpointing=True)
    zero_1, zero_3 = rank_bytes(shape), rank_bytes(dataclasses.replace(shape, zero_stage=3))
    parameters = shape.counts.total
    assert zero_1[0] - zero_1[1] == 4 * parameters and len(set(zero_1[1:])) == 1  # rank 0 adds the fp32 weights
    assert len(set(zero_3)) == 1 and 256 * zero_3[0] <= 12 * parameters  # master + 2 moments, split 256 ways
    cost = checkpoint_cost(shape, upload_gbps=1.0)
    assert cost.upload_s == pytest.approx(zero_1[0] / 1e9) and cost.stall_background_s < cost.stall_upload_first_s
    assert plan_main(["--model", "ViT-L/14", "--gpus", "256", "--upload-gbps", "1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"checkpoint: {sum(zero_1) / 1e9:.2f} GB in all, {zero_1[0] / 1e9:.2f} GB from the rank")
    assert f"{cost.stall_upload_first_s:.2f} s uploading first (at 1 GB/s per worker" in line
