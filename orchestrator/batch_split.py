"""How a step's batch is split: each worker's share of the global batch, and a share into accumulation chunks.

One rule for everyone who needs it: the run config (``RunConfig.worker_batch_sizes`` and
``accumulation_chunks``, what the workers train), its validation, and the planner (``choose_micro_batch``
and the micro-batch its plans print). A leaf: it imports nothing of ours.
"""

from __future__ import annotations


def worker_shares(global_batch: int, world_size: int) -> list[int]:
    """Samples each of ``world_size`` workers trains on per step, by rank: as even as it goes, ranks below
    ``global_batch % world_size`` taking one sample more (so the largest share is the ceiling)."""
    base, extra = divmod(global_batch, world_size)
    return [base + (rank < extra) for rank in range(world_size)]


def balanced_micro_batch(share: int, largest: int) -> tuple[int, int]:
    """(micro-batch, chunks) for a worker's ``share``: the fewest chunks of at most ``largest`` rows, then the
    rows spread evenly over them (so the micro-batch never exceeds ``largest``, and chunks x it covers the share)."""
    chunks = -(-share // largest)
    return -(-share // chunks), chunks
