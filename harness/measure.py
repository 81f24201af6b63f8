"""Real DeepSpeed training steps on CPU (gloo) that check the planner: allocator peak and collective bytes.

Memory is read at the allocator: ``torch.profiler`` with ``profile_memory`` records every allocation and
free that PyTorch's CPU allocator makes (the same hook the CUDA caching allocator reports through), in
order, with its size. Their running sum from an empty process is the allocated bytes at every instant, and
its maximum over the measured step is the counterpart of ``torch.cuda.max_memory_allocated``. Process RSS
would not do: glibc keeps freed pages, and untouched ``torch.empty`` buffers (DeepSpeed's bucket) never
become resident. What the allocator does not see (gloo's own buffers, Python objects) is not counted, as
on a GPU.

Collectives are counted by wrapping ``torch.distributed``'s functions before DeepSpeed binds them, as
payloads (an all-reduce's tensor, an all-gather's output, a reduce-scatter's or reduce's input), which
is what ``orchestrator.plan.collective_payloads`` predicts.
"""

from __future__ import annotations

import functools
import os
import time
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist

from models import ClipLoss, weight_decay_groups
from orchestrator.collectives import all_reduce_sum, gather_with_grad
from orchestrator.config import RunConfig
from orchestrator.train import accumulated_step, build_model, deepspeed_config, single_chunk_step

_KIND = {  # torch.distributed function -> (payload kind, which argument holds the payload)
    "all_reduce": ("all_reduce", 0),
    "all_reduce_coalesced": ("all_reduce", 0),
    "reduce": ("reduce_scatter", 0),
    "all_gather": ("all_gather", 0),
    "all_gather_into_tensor": ("all_gather", 0),
    "_all_gather_base": ("all_gather", 0),
    "reduce_scatter": ("reduce_scatter", 1),
    "reduce_scatter_tensor": ("reduce_scatter", 1),
    "_reduce_scatter_base": ("reduce_scatter", 1),
    "broadcast": ("broadcast", 0),
}


class CollectiveCounter:
    """Payload bytes by kind of every ``torch.distributed`` collective called while ``counting`` is true."""

    def __init__(self) -> None:
        self.payload: Counter[str] = Counter()
        self.counting = False

    def install(self) -> None:
        """Wrap the collectives in ``torch.distributed`` (call before DeepSpeed looks them up)."""
        for name, (kind, index) in _KIND.items():
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._wrap(original, kind, index))

    def _wrap(self, original, kind: str, index: int):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            if self.counting:
                payload = args[index] if len(args) > index else next(iter(kwargs.values()))
                self.payload[kind] += _nbytes(payload)
            return original(*args, **kwargs)

        return counted


def _nbytes(payload: Any) -> int:
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    return sum(_nbytes(item) for item in payload)


def synthetic_batch(rows: int, image_size: int, context_length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and full-context captions (the text tower then runs every position, as the plan assumes)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(rows, 3, image_size, image_size, generator=generator)
    tokens = torch.randint(300, 5000, (rows, context_length), generator=generator)
    tokens[:, 0], tokens[:, -1] = 49406, 49407
    return images, tokens


def allocation_peak(profiler, start_ns: int, end_ns: int) -> int:
    """The largest running sum of allocator events reached between ``start_ns`` and ``end_ns``."""
    events = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]")
    allocated = peak = 0
    for when, size in events:
        allocated += size
        if start_ns <= when <= end_ns:
            peak = max(peak, allocated)
    return peak


def measure_steps(cfg_dict: dict[str, Any], rank: int, world_size: int, port: int, *,
                  zero_overrides: dict[str, Any] | None = None, steps: int = 2) -> dict[str, Any]:
    """Train ``steps`` DeepSpeed steps of ``cfg_dict`` as ``rank`` of ``world_size`` gloo processes.

    Returns the allocator peak and the collective payloads of the last step (the first one allocates
    the optimizer state, so the last is the steady state) and its loss.
    """
    import deepspeed
    from torch.profiler import ProfilerActivity, profile

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))  # what DeepSpeed reads
    counter = CollectiveCounter()
    counter.install()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    cfg = RunConfig.from_dict(cfg_dict)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        model = build_model(cfg)
        config = deepspeed_config(cfg, world_size)
        config["zero_optimization"].update(zero_overrides or {})
        engine, *_ = deepspeed.initialize(model=model, model_parameters=weight_decay_groups(model, cfg.optim.weight_decay),
                                          config=config)
        rows = cfg.worker_batch_size(world_size, rank)
        chunks = cfg.accumulation_chunks(world_size)
        spec = cfg.model.spec()
        for step in range(steps):
            images, tokens = synthetic_batch(rows, spec.vision.image_size, spec.text.context_length, seed=rank + 10 * step)
            counter.counting = step == steps - 1
            start = time.time_ns()
            result = _step(engine, images, tokens, chunks)
            end = time.time_ns()
            counter.counting = False
    peak = allocation_peak(profiler, start, end)
    dist.destroy_process_group()
    return {"peak_bytes": peak, "payload": dict(counter.payload), "loss": float(result.loss)}


def _step(engine, images: torch.Tensor, tokens: torch.Tensor, chunks: int):
    def backward(loss: torch.Tensor) -> None:
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()

    common = dict(loss=ClipLoss(gather_with_grad), backward=backward, all_reduce=all_reduce_sum)
    if chunks == 1:
        return single_chunk_step(engine, images, tokens, **common)
    return accumulated_step(engine, images, tokens, chunks=chunks, **common)
