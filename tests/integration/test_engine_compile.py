"""``model.compile=true``: the DeepSpeed engine runs a torch.compile'd CLIP that trains like the eager one.

Runs in a subprocess (one gloo rank: DeepSpeed's process group must not outlive the test). The same
three optimizer steps, with two different caption lengths (the text tower stops at the batch's longest
caption, so the compiled graph meets a new shape), eager and compiled: the losses agree to float32
round-off, and dynamo really compiled frames.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def _losses(compile_model: bool) -> tuple[list[float], bool]:
    import torch
    from torch._dynamo.utils import counters

    from models import ClipLoss
    from orchestrator.collectives import all_reduce_sum, gather_with_grad
    from orchestrator.config import load_config
    from orchestrator.train import single_chunk_step
    from orchestrator.train import build_engine, build_model

    cfg = load_config(overrides=[f"model.compile={str(compile_model).lower()}", "deepspeed.micro_batch_size=6",
                                 "deepspeed.zero_stage=1", "deepspeed.precision=fp32"])
    engine = build_engine(cfg, build_model(cfg), world_size=1)

    def backward(loss):
        engine.backward(loss)
        engine.step()

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, cfg.model.spec().vision.image_size, cfg.model.spec().vision.image_size,
                         generator=generator)
    captions = {}
    for length in (9, 14):
        tokens = captions[length] = torch.zeros(6, 77, dtype=torch.long)
        tokens[:, 0], tokens[:, length - 1] = 49406, 49407
        tokens[:, 1:length - 1] = torch.randint(300, 5000, (6, length - 2), generator=generator)
    losses = []
    for tokens in (captions[9], captions[9], captions[14]):
        result = single_chunk_step(engine, images, tokens, loss=ClipLoss(gather_with_grad), backward=backward,
                                   all_reduce=all_reduce_sum)
        losses.append(float(result.loss))
    return losses, engine.is_compiled and counters["stats"]["unique_graphs"] > 0


def test_compiled_engine_trains_like_the_eager_one(tmp_path):
    from harness.local_servers import free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"}
    run = subprocess.run([sys.executable, __file__, str(tmp_path / "out.json")], env=env, cwd=REPO_ROOT,
                         timeout=600, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    outcome = json.loads((tmp_path / "out.json").read_text())
    eager, compiled = outcome["eager"], outcome["compiled"]
    assert not outcome["eager_compiled"] and outcome["compiled_compiled"]
    assert eager[1] < eager[0]  # it trains (the same batch twice)
    for ours, reference in zip(compiled, eager):
        assert abs(ours - reference) < 1e-4 * max(1.0, abs(reference)), (compiled, eager)


if __name__ == "__main__":
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    eager_losses, eager_compiled = _losses(False)
    compiled_losses, compiled_compiled = _losses(True)
    Path(sys.argv[1]).write_text(json.dumps({"eager": eager_losses, "compiled": compiled_losses,
                                             "eager_compiled": eager_compiled, "compiled_compiled": compiled_compiled}))
