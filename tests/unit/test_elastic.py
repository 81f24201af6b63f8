"""Elastic runs: the worker range in the config, and a resize that leaves the optimisation unchanged.

The proof: one global batch trained by 2 real gloo processes x 2 chunks and by 4 processes x 1 chunk
(the chunks and per-worker batch the config derives for each count, the step functions the workers run,
gradients averaged over ranks as DeepSpeed does) gives the loss and every gradient of the single-process
step on the whole batch.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models import ClipLoss, create_model
from orchestrator.collectives import all_reduce_sum, gather_with_grad
from orchestrator.config import ConfigError, RunConfig
from orchestrator.train import accumulated_step, single_chunk_step
from tests.factories import parameter_gradients, random_batch
from tests.local_servers import free_port

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
    assert (cfg.accumulation_chunks(3), cfg.worker_batch_size(3), cfg.data.batch_size) == (2, 64, 64)


def test_the_plan_at_every_count_of_a_valid_range():
    cfg = RunConfig.from_dict({"scaling": {"num_workers": [2, 4]}, "deepspeed": {"micro_batch_size": 4,
                               "global_batch_size": 48}, "schedule": {"warmup_steps": 10}})
    plan = [(n, cfg.accumulation_chunks(n), cfg.worker_batch_size(n)) for n in cfg.scaling.worker_counts]
    assert plan == [(2, 6, 24), (3, 4, 16), (4, 3, 12)]
    assert cfg.data.batch_size == 12  # the stream's per-worker batch at the largest count


@pytest.mark.parametrize("scaling, deepspeed, expected", [
    ({"num_workers": [1, 3]}, {"micro_batch_size": 64},
     "the global batch 192 (micro_batch_size 64 x grad_accum_steps 1 x 3 workers) cannot be split over "
     "scaling.num_workers=[1, 3]: not a whole number of 64-sample micro-batches per worker with [2] workers; "
     "allowed: a global batch that is a multiple of 384"),
    ({"num_workers": [2, 5]}, {"micro_batch_size": 8, "global_batch_size": 160},
     "deepspeed.global_batch_size=160 cannot be split over scaling.num_workers=[2, 5]: not a whole number of "
     "8-sample micro-batches per worker with [3] workers; allowed: a global batch that is a multiple of 480"),
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


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    cfg, model = _config(), _model()
    chunks, local = cfg.accumulation_chunks(world_size), cfg.worker_batch_size(world_size)
    images, tokens = _batch()
    mine = slice(rank * local, (rank + 1) * local)
    args = dict(gather=gather_with_grad, backward=lambda loss: loss.backward(), all_reduce=all_reduce_sum)
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
    if rank == 0:
        torch.save({"loss": loss, "grads": grads, "chunks": chunks}, os.path.join(out_dir, f"world{world_size}.pt"))
    dist.destroy_process_group()


def test_two_workers_by_two_chunks_train_exactly_as_four_by_one(tmp_path):
    for world_size in (2, 4):
        mp.spawn(_worker, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    two, four = (torch.load(tmp_path / f"world{n}.pt") for n in (2, 4))
    assert (two["chunks"], four["chunks"]) == (2, 1)
    model = _model()
    images, tokens = _batch()
    reference_loss = ClipLoss()(*model(images, tokens))
    reference_loss.backward()
    reference = parameter_gradients(model)
    assert "logit_scale" in reference and two["grads"].keys() == four["grads"].keys() == reference.keys()
    for result in (two, four):
        torch.testing.assert_close(result["loss"].reshape(()), reference_loss.detach(), rtol=1e-5, atol=1e-6)
        for name, grad in reference.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # float round-off only: far below how much the gradient moves for a different batch
    worst = max(float((two["grads"][k] - four["grads"][k]).norm() / reference[k].norm()) for k in reference)
    assert worst < 1e-4


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
