"""A ZeRO checkpoint written by 2 ranks restores exactly on 1 and on 3 (real gloo processes, DeepSpeed).

``orchestrator.train.checkpoint.restore`` converts it to DeepSpeed's universal layout (local rank 0, once) and the
engine built with ``load_universal`` re-partitions it: the fp32 master weights and both Adam moments,
reassembled across ranks, must equal the writer's bit for bit, and the scheduler must continue at the
same learning rate.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator import runs, storage

pytestmark = pytest.mark.integration


def _full_optimizer_state(engine, world: int) -> list[list[torch.Tensor]]:
    """Per parameter group: [fp32 master, exp_avg, exp_avg_sq], flat, gathered from every rank's partition."""
    optimizer = engine.optimizer
    groups = []
    for index, partition in enumerate(optimizer.single_partition_of_fp32_groups):
        moments = optimizer.optimizer.state[partition]
        local = [partition.detach().clone(), moments["exp_avg"].clone(), moments["exp_avg_sq"].clone()]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, local)
        numel = sum(p.numel() for p in optimizer.bit16_groups[index])  # drop the alignment padding
        groups.append([torch.cat([part[kind] for part in gathered])[:numel] for kind in range(3)])
    return groups


def _rank(rank: int, world: int, port: int, mode: str, directory: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed

    from orchestrator import runs, storage
    from orchestrator.train import checkpoint as checkpoints
    from orchestrator.config import load_config
    from orchestrator.train import build_engine, build_model

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    cfg = load_config(overrides=["deepspeed.zero_stage=2", "deepspeed.micro_batch_size=4"])
    engine = build_engine(cfg, build_model(cfg), world, load_universal=mode == "resume")
    if mode == "write":
        generator = torch.Generator().manual_seed(rank)
        tokens = torch.zeros(4, 77, dtype=torch.long)
        tokens[:, 0], tokens[:, 1], tokens[:, 2] = 49406, torch.arange(320, 324), 49407
        for _ in range(2):
            image_features, text_features, scale = engine(torch.randn(4, 3, 32, 32, generator=generator), tokens)
            loss = (scale * image_features @ text_features.T).log_softmax(dim=1).diagonal().neg().mean()
            engine.backward(loss)
            engine.step()
        checkpoints.write_local_checkpoint(engine, checkpoints.TrainState(step=2, world_size=world), rank, directory)
    else:
        info = runs.checkpoint_info(storage.resolve(directory))  # its manifest, written as a save writes it
        state = checkpoints.restore(engine, info, rank, world, local_rank=rank)
        assert state.step == 2 and state.world_size == world
    groups = _full_optimizer_state(engine, world)
    if rank == 0:
        torch.save({"groups": groups, "lr": engine.get_lr(), "steps": engine.global_steps},
                   os.path.join(directory, f"{mode}-{world}.pt"))
    dist.destroy_process_group()


def test_two_rank_checkpoint_restores_exactly_on_one_and_three_ranks(tmp_path):
    from harness.local_servers import free_port

    directory = str(tmp_path / "checkpoint")
    os.makedirs(directory)
    mp.spawn(_rank, args=(2, free_port(), "write", directory), nprocs=2)
    runs.write_manifest(storage.resolve(directory), 2, 2, runs.describe_files(directory))
    written = torch.load(os.path.join(directory, "write-2.pt"))
    assert written["steps"] == 2 and any(group[1].abs().sum() > 0 for group in written["groups"])
    for world in (1, 3):
        mp.spawn(_rank, args=(world, free_port(), "resume", directory), nprocs=world)
        restored = torch.load(os.path.join(directory, f"resume-{world}.pt"))
        assert restored["steps"] == 2 and restored["lr"] == written["lr"]
        for ours, theirs in zip(restored["groups"], written["groups"], strict=True):
            for kind, (a, b) in enumerate(zip(ours, theirs, strict=True)):
                assert torch.equal(a, b), (world, ["fp32 master", "exp_avg", "exp_avg_sq"][kind])
    key = hashlib.sha1(directory.encode()).hexdigest()[:16]
    assert not os.path.exists(os.path.join(tempfile.gettempdir(), f"rayclip-universal-{key}"))  # scratch removed
