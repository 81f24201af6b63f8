"""Elastic runs: the worker range in the config, and a resize that leaves the optimisation unchanged.

The proof: one global batch of 16 trained by 2 real gloo processes x 2 chunks, by 3 processes holding 6, 5
and 5 samples x 2 chunks, and by 4 processes x 1 chunk (the chunks and per-worker shares the config derives
for each count, the step functions and loss weights the workers use, gradients averaged over ranks as
DeepSpeed does) gives the loss and every gradient of the single-process step on the whole batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.local_servers import free_port
from models import ClipLoss, create_model
from orchestrator.collectives import all_gather_objects, all_reduce_sum, gather_with_grad
from orchestrator.config import ConfigError, RunConfig
from orchestrator.train import accumulated_step, single_chunk_step
from tests.factories import parameter_gradients, random_batch

GLOBAL_BATCH = 16
MICRO_BATCH = 4


def _config(**deepspeed) -> RunConfig:
    return RunConfig.from_dict({"model": {"name": "ViT-tiny"}, "scaling": {"num_workers": 4},
                                "deepspeed": {"micro_batch_size": MICRO_BATCH, "global_batch_size": GLOBAL_BATCH,
                                              **deepspeed}, "schedule": {"warmup_steps": 10}})


def test_a_fixed_count_keeps_its_old_meaning():
    cfg = RunConfig.from_dict({"scaling": {"num_workers": 3}, "deepspeed": {"micro_batch_size": 32, "grad_accum_steps": 2},
                               "schedule": {"warmup_steps": 10}})
    assert not cfg.scaling.elastic and cfg.global_batch_size == 192
    assert (cfg.accumulation_chunks(3), cfg.worker_batch_sizes(3), cfg.data.batch_size) == (2, [64] * 3, 64)


def test_the_plan_at_every_count_of_a_valid_range():
    cfg = RunConfig.from_dict({"scaling": {"num_workers": [2, 4]}, "deepspeed": {"micro_batch_size": 4,
                               "global_batch_size": 48}, "schedule": {"warmup_steps": 10}})
    plan = [(n, cfg.accumulation_chunks(n), cfg.worker_batch_size(n, n - 1)) for n in cfg.scaling.worker_counts]
    assert plan == [(2, 6, 24), (3, 4, 16), (4, 3, 12)]
    assert cfg.data.batch_size == 12  # the stream's per-worker batch at the largest count


def test_a_global_batch_that_does_not_divide_is_shared_unevenly():
    """32,768 over 129..255 workers: shares differ by one sample, every rank runs the same chunk count."""
    cfg = RunConfig.from_dict({"scaling": {"num_workers": [128, 256]}, "deepspeed": {"micro_batch_size": 128,
                               "global_batch_size": 32768}, "schedule": {"warmup_steps": 10}})
    for workers in cfg.scaling.worker_counts:
        sizes = cfg.worker_batch_sizes(workers)
        assert sum(sizes) == 32768 and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        assert min(sizes) >= cfg.accumulation_chunks(workers)
    assert [cfg.accumulation_chunks(n) for n in (128, 129, 255, 256)] == [2, 2, 2, 1]
    assert cfg.worker_batch_sizes(129)[:3] == [255, 255, 254] and cfg.worker_batch_sizes(129).count(255) == 2
    assert cfg.describe_batch_plan(129) == "129 x 254-255 samples in 2 chunk(s)"
    assert cfg.describe_batch_plan(128) == "128 x 128 x 2 chunks"


def test_the_spot_recipe_is_the_paper_recipe_at_every_worker_count():
    from orchestrator.config.loading import load_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    spot, fixed = load_config(configs / "vit_l14_spot.yaml"), load_config(configs / "vit_l14.yaml")
    for section in ("model", "optim", "schedule", "loss", "data"):
        assert getattr(spot, section) == getattr(fixed, section), section
    assert spot.scaling.worker_counts == range(64, 257) and fixed.scaling.num_workers == 256
    for workers in spot.scaling.worker_counts:  # the global batch of the fixed run, in chunks no larger than its
        sizes, chunks = spot.worker_batch_sizes(workers), spot.accumulation_chunks(workers)
        assert sum(sizes) == fixed.global_batch_size == 32768
        assert -(-max(sizes) // chunks) <= fixed.deepspeed.micro_batch_size


@pytest.mark.parametrize("scaling, deepspeed, expected", [
    ({"num_workers": [2, 8]}, {"micro_batch_size": 4, "global_batch_size": 6},
     "deepspeed.global_batch_size=6 cannot be split over scaling.num_workers=[2, 8]: with [7, 8] workers some "
     "worker would hold fewer samples than the step's chunks (every worker runs as many as the largest share "
     "needs); allowed: a global batch of at least 8, or a smaller worker range"),
    ({"num_workers": [4, 5]}, {"micro_batch_size": 1, "global_batch_size": 12},
     "deepspeed.global_batch_size=12 cannot be split over scaling.num_workers=[4, 5]: with [5] workers some worker "
     "would hold fewer samples than the step's chunks (every worker runs as many as the largest share needs); "
     "allowed: micro_batch_size 2 or more, or a global batch that every count divides (a multiple of 20)"),
    ({"num_workers": 4}, {"micro_batch_size": 8, "global_batch_size": 64, "grad_accum_steps": 3},
     "deepspeed.grad_accum_steps=3 disagrees with deepspeed.global_batch_size=64: the chunks follow from it "
     "(2 at 4 workers); allowed: 1 (unset) or 2"),
    ({"num_workers": [3, 2]}, {}, "scaling.num_workers = [3, 2]: must be a positive count or [min, max] with 1 <= min <= max"),
])
def test_a_batch_plan_that_cannot_split_names_the_counts(scaling, deepspeed, expected):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"scaling": scaling, "deepspeed": deepspeed, "schedule": {"warmup_steps": 10}})
    assert expected in str(error.value)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return random_batch(GLOBAL_BATCH, seed=3, lengths=(4, 11))


def _model():
    torch.manual_seed(0)
    return create_model("ViT-tiny")


def _worker(rank: int, world_size: int, port: int, out_dir: str, weighted: bool = True) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    cfg, model = _config(), _model()
    chunks, sizes = cfg.accumulation_chunks(world_size), cfg.worker_batch_sizes(world_size)
    images, tokens = _batch()
    start = sum(sizes[:rank])
    mine = slice(start, start + sizes[rank])
    backward_calls = []

    def backward(loss):
        backward_calls.append(1)
        loss.backward()

    args = dict(loss=ClipLoss(gather_with_grad), backward=backward, all_reduce=all_reduce_sum,
                loss_weight=world_size * sizes[rank] / GLOBAL_BATCH if weighted else 1.0)  # as the worker loop does
    if chunks == 1:
        result = single_chunk_step(model, images[mine], tokens[mine], **args)
    else:
        result = accumulated_step(model, images[mine], tokens[mine], chunks=chunks, **args)
    assert result.finite
    grads = parameter_gradients(model)
    for grad in grads.values():  # data-parallel averaging, as DeepSpeed does
        dist.all_reduce(grad)
        grad /= world_size
    loss = all_reduce_sum(result.loss.reshape(1).clone()) / world_size
    calls = all_gather_objects(len(backward_calls))  # DeepSpeed needs the same count of backward calls everywhere
    if rank == 0:
        torch.save({"loss": loss, "grads": grads, "chunks": chunks, "sizes": sizes, "backward_calls": calls},
                   os.path.join(out_dir, f"world{world_size}{'' if weighted else '-unweighted'}.pt"))
    dist.destroy_process_group()


def test_two_workers_by_two_chunks_train_exactly_as_four_by_one_and_three_uneven(tmp_path):
    for world_size in (2, 3, 4):
        mp.spawn(_worker, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    two, three, four = (torch.load(tmp_path / f"world{n}.pt") for n in (2, 3, 4))
    assert (two["chunks"], three["chunks"], four["chunks"]) == (2, 2, 1)
    assert three["sizes"] == [6, 5, 5] and three["backward_calls"] == [2, 2, 2]
    model = _model()
    images, tokens = _batch()
    reference_loss = ClipLoss()(*model(images, tokens))
    reference_loss.backward()
    reference = parameter_gradients(model)
    assert "logit_scale" in reference and two["grads"].keys() == four["grads"].keys() == reference.keys()
    for result in (two, three, four):
        torch.testing.assert_close(result["loss"].reshape(()), reference_loss.detach(), rtol=1e-5, atol=1e-6)
        for name, grad in reference.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # float round-off only: far below how much the gradient moves for a different batch
    for other in (three, four):
        worst = max(float((two["grads"][k] - other["grads"][k]).norm() / reference[k].norm()) for k in reference)
        assert worst < 1e-4
    # the weighting is what makes uneven shares exact: unweighted, the 6-sample rank counts like a 5-sample one
    mp.spawn(_worker, args=(3, free_port(), str(tmp_path), False), nprocs=3, join=True)
    unweighted = torch.load(tmp_path / "world3-unweighted.pt")
    assert abs(float(unweighted["loss"]) - float(reference_loss.detach())) > 1e-3


def test_a_fixed_count_without_a_global_batch_scales_its_batch_with_the_workers():
    """An engine built for another count than the config's (``--resume`` on a resized cluster, or a test):
    the per-worker plan stays, as before elastic training existed."""
    from orchestrator.train.engine import deepspeed_config

    cfg = RunConfig.from_dict({"scaling": {"num_workers": 2}, "deepspeed": {"micro_batch_size": 4, "grad_accum_steps": 3},
                               "schedule": {"warmup_steps": 10}})
    for world_size in (1, 2, 3):
        ds = deepspeed_config(cfg, world_size)
        assert (ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 12 * world_size)
    elastic = _config()  # global batch 16 fixed: the chunks follow the count
    assert [(deepspeed_config(elastic, n)["gradient_accumulation_steps"], deepspeed_config(elastic, n)["train_batch_size"])
            for n in (1, 2, 4)] == [(4, 16), (2, 16), (1, 16)]
