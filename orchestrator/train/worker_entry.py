"""The function Ray Train runs on each worker, in a module of its own.

Ray Train's controller unpickles the training function by reference, importing its module: kept here, the
controller imports nothing of the training code (torch, DeepSpeed, evaluation, seconds of a run's start on
a small machine); the workers import it when they run it.
"""

from __future__ import annotations

from typing import Any


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``orchestrator.train.worker_loop.train_loop_per_worker``."""
    from orchestrator.train.worker_loop import train_loop_per_worker

    train_loop_per_worker(config)
