"""Step time from FLOPs at a stated MFU plus communication at the instance's bandwidth.

Compute: training FLOPs per sample are 3 x the forward FLOPs of the image tower and of the text tower at
the captions' length (``CAPTION_TOKENS``, as ``benchmarks/gpu_step.py`` counts them, so the project's
measured MFU maps back onto time exactly); a wholly locked tower runs its forward only (1 x instead of 3 x). Gradient checkpointing adds one forward, and an accumulated step
(several chunks) one more: its feature pass without gradient. The default MFU is the project's own
measurement for the model (``benchmarks/results/gpu_step_h100.jsonl``: DeepSpeed, bf16 autocast, eager or
compiled as the run is), assumed to carry over to other GPU types as the same fraction of their peak.

Communication, per optimizer step and rank, as collective payloads (an all-reduce's tensor, an
all-gather's output, a reduce-scatter's input): ZeRO-0 all-reduces the gradients; ZeRO-1 reduce-scatters
them once and all-gathers the updated parameters; ZeRO-2 reduce-scatters every chunk's gradients; ZeRO-3
also all-gathers the parameters for every chunk's forward and the feature pass (a model below DeepSpeed's
1e9-element reuse distance stays gathered through backward and recompute, see ``memory.py``; a larger one is
gathered again for backward and for a checkpointed recompute). Under autocast DeepSpeed reduces matmul/conv gradients in bf16. The loss
all-gathers the image and text features once per step and all-reduces their gradient (gloo has no
reduce-scatter: ``orchestrator/collectives.py``). With a locked tower (``memory.TowerLock``) only the
trainable parameters' gradients are reduced and, under ZeRO 1/2, their updated values gathered (DeepSpeed
flattens only the optimizer's parameters); ZeRO-3 gathers every parameter, locked or not. A ring moves (W-1)/W of a payload per rank, twice for an
all-reduce, at NVLink speed inside a node and at the node's network bandwidth / GPUs per node across nodes.

Overlap: ZeRO 0-2 communicate after or inside backward on the compute stream (rayclip leaves DeepSpeed's
``overlap_comm`` at its default, off below ZeRO-3), so their time adds to compute; ZeRO-3 prefetches and
overlaps (``overlap_comm`` on), so its parameter traffic hides behind compute up to the compute time. The
feature all-gather is on the critical path in every stage.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from orchestrator.plan.gpus import GpuType
from orchestrator.plan.memory import MAX_LIVE_PARAMETERS, StepShape

CAPTION_TOKENS = 20  # a typical web caption with [SOS]/[EOS]; the text tower stops at the batch's longest
DEFAULT_MFU = 0.15  # for a model the project has not measured: between its eager ViT-L/14 (19%) and RN50x64 (12%)
LINK_EFFICIENCY = 0.7  # share of the vendor link rate NCCL's ring collectives reach (nccl-tests bus bandwidth)
MEASUREMENTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "gpu_step_h100.jsonl"


@dataclass(frozen=True)
class MeasuredMfu:
    mfu: float
    source: str
    """Where the figure comes from, for the printed plan."""


def measured_mfu(model: str, *, compiled: bool, path: Path = MEASUREMENTS) -> MeasuredMfu:
    """The best MFU the project measured for ``model`` under DeepSpeed + autocast (eager or compiled) with CLIP's
    loss and every patch token, else the default."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    matching = [r for r in rows if r["model"] == model and r.get("deepspeed") and r.get("precision") == "autocast"
                and r["compile"] == compiled and not r.get("patch_dropout") and r.get("loss", "clip") == "clip"]
    if not matching:
        return MeasuredMfu(DEFAULT_MFU, f"default {DEFAULT_MFU:.0%} (no measurement of {model} in {path.name})")
    best = max(matching, key=lambda r: r["mfu"])
    how = "compiled" if compiled else "eager"
    return MeasuredMfu(best["mfu"], f"{path.name}: {model} {how}, micro-batch {best['batch']} on an H100")


def train_flops_per_sample(forward_flops: tuple[int, int], locked: frozenset[str] = frozenset()) -> float:
    """3 x (image forward + text forward at ``CAPTION_TOKENS``): forward plus a backward of twice its cost;
    a tower in ``locked`` ("image", "text": wholly locked) counts its forward alone."""
    image, text = forward_flops
    return (1.0 if "image" in locked else 3.0) * image + (1.0 if "text" in locked else 3.0) * text


def compute_multiplier(shape: StepShape) -> float:
    """Executed FLOPs over the 3 x forward that MFU counts: + a forward for checkpointing, + one for chunks > 1."""
    forwards = 3 + (1 if shape.grad_checkpointing else 0) + (1 if shape.chunks > 1 else 0)
    return forwards / 3


def collective_payloads(shape: StepShape) -> dict[str, int]:
    """Bytes per optimizer step and rank, by collective (see the module docstring); one rank: none."""
    if shape.world_size == 1:
        return {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}
    counts = shape.counts
    wb = shape.weight_bytes
    low = 2 if shape.precision in ("autocast", "bf16") else 4
    other = counts.trainable - counts.trainable_matmul
    grads = counts.trainable_matmul * low + other * (2 if shape.precision == "bf16" else 4)
    z, chunks = shape.zero_stage, shape.chunks
    payload = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}
    if z == 0:
        payload["all_reduce"] += grads
    else:
        payload["reduce_scatter"] += grads * (1 if z == 1 else chunks)
    if z in (1, 2):
        payload["all_gather"] += counts.trainable * wb
    if z == 3:
        regathered = counts.total > MAX_LIVE_PARAMETERS
        passes = 1 + (1 + (1 if shape.grad_checkpointing else 0) if regathered else 0)
        feature_pass = 1 if chunks > 1 else 0
        payload["all_gather"] += counts.total * wb * (passes * chunks + feature_pass)
    features = 2 * shape.global_batch * shape.spec.embed_dim * 4  # image and text features, float32
    rows_exchange = 2 * 8 * shape.world_size  # each gather first exchanges the ranks' row counts
    payload["all_gather"] += features + rows_exchange
    payload["all_reduce"] += features
    return payload


def ring_bytes(payload: dict[str, int], world_size: int) -> float:
    """Bytes each rank sends in ring collectives for these payloads."""
    share = (world_size - 1) / world_size
    return share * (2 * payload["all_reduce"] + payload["all_gather"] + payload["reduce_scatter"])


def link_bytes_per_s(gpu: GpuType, world_size: int) -> float:
    """Per-rank ring bandwidth: NVLink inside one node, the node's network split over its GPUs beyond."""
    if world_size <= gpu.gpus_per_node:
        return gpu.intra_node_bytes_per_s * LINK_EFFICIENCY
    return min(gpu.intra_node_bytes_per_s, gpu.inter_node_bytes_per_s / gpu.gpus_per_node) * LINK_EFFICIENCY


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    zero_comm_s: float
    feature_comm_s: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.zero_comm_s + self.feature_comm_s


def step_time(shape: StepShape, gpu: GpuType, flops_per_sample: float, mfu: float) -> StepTime:
    """Compute and communication time of one optimizer step (overlap as the module docstring states)."""
    compute = shape.worker_batch * flops_per_sample * compute_multiplier(shape) / (mfu * gpu.bf16_flops)
    payload = collective_payloads(shape)
    features = 2 * shape.global_batch * shape.spec.embed_dim * 4
    feature_payload = {"all_reduce": features, "all_gather": features, "reduce_scatter": 0}
    zero_payload = {k: v - feature_payload[k] for k, v in payload.items()}
    bandwidth = link_bytes_per_s(gpu, shape.world_size)
    zero_s = ring_bytes(zero_payload, shape.world_size) / bandwidth if shape.world_size > 1 else 0.0
    feature_s = ring_bytes(feature_payload, shape.world_size) / bandwidth if shape.world_size > 1 else 0.0
    if shape.zero_stage == 3:
        zero_s = max(0.0, zero_s - compute)  # prefetched gathers hide behind compute
    return StepTime(compute, zero_s, feature_s)


def days_for(samples: float, samples_per_s: float) -> float:
    return samples / samples_per_s / 86400 if samples_per_s > 0 else math.inf
