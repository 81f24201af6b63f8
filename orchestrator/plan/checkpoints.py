"""What a checkpoint costs: the bytes each rank writes, and how long training stops for them.

DeepSpeed's files (``orchestrator/train/checkpoint.py`` adds a few small ones: the train state, each rank's RNG
states, the manifest), with P parameters of which T train, W ranks and the weight dtype's bytes b:

- ZeRO 1/2: rank 0 writes the module's weights (b x P, ``mp_rank_00_model_states.pt``); every rank writes its
  optimizer partition: the fp32 master weights and Adam's two fp32 moments, 12 x T / W
  (``zero_pp_rank_R_mp_rank_00_optim_states.pt``);
- ZeRO-3: the weights are partitioned too, so every rank writes the same share: its optimizer partition and its
  part of the locked parameters, (12 x T + b x (P - T)) / W;
- ZeRO-0: rank 0 writes everything: the weights, the moments (8 x T) and, with bf16 weights, the fp32 master.

The slowest rank (rank 0 under ZeRO 0-2) decides how long a synchronous checkpoint stops the whole run: its local
write, then its upload. With ``checkpoint.background`` (the default) training stops for the local write alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.plan.memory import StepShape

LOCAL_WRITE_GBPS = 2.0
"""A worker's write into its local scratch folder (the page cache, then a local NVMe disk), GB/s."""
UPLOAD_GBPS = 0.5
"""One worker process's upload to S3 (pyarrow's multi-threaded copy), GB/s: an assumption ``--upload-gbps`` sets."""


@dataclass(frozen=True)
class CheckpointCost:
    largest_rank_bytes: int
    """What the rank that writes most writes (rank 0 under ZeRO 0-2)."""
    total_bytes: int
    """The whole checkpoint, every rank's files."""
    upload_gbps: float
    local_write_s: float
    """The largest rank's local write: what a background checkpoint stops training for."""
    upload_s: float
    """The largest rank's upload: what a synchronous checkpoint stops training for on top."""

    @property
    def stall_upload_first_s(self) -> float:
        return self.local_write_s + self.upload_s

    @property
    def stall_background_s(self) -> float:
        return self.local_write_s


def rank_bytes(shape: StepShape) -> list[int]:
    """The bytes of DeepSpeed's checkpoint files that each rank writes, in rank order."""
    counts, w, z, b = shape.counts, shape.world_size, shape.zero_stage, shape.weight_bytes
    p, t = counts.total, counts.trainable
    if z == 0:
        master = 4 * t if shape.precision == "bf16" else 0
        return [b * p + 8 * t + master] + [0] * (w - 1)
    if z == 3:
        return [(12 * t + b * (p - t)) // w] * w
    partition = 12 * t // w
    return [b * p + partition] + [partition] * (w - 1)


def checkpoint_cost(shape: StepShape, upload_gbps: float = UPLOAD_GBPS) -> CheckpointCost:
    sizes = rank_bytes(shape)
    largest = max(sizes)
    return CheckpointCost(largest_rank_bytes=largest, total_bytes=sum(sizes), upload_gbps=upload_gbps,
                          local_write_s=largest / (LOCAL_WRITE_GBPS * 1e9), upload_s=largest / (upload_gbps * 1e9))
