"""The line between a job's driver and its Train workers: stop requests one way, the run's end report the other.

The driver (``orchestrator.train.job``) creates one small named :class:`RunControl` actor per run. On Ctrl-C or
SIGTERM it calls ``request_stop``: in the Train workers, rank 0 asks the actor every ``POLL_S`` seconds in a
background thread (never on the step's path), and every rank learns the answer from one all-reduce of a single
number before each step, so all ranks stop after the same step (a checkpoint, then the end). At the end, rank 0
leaves what the driver prints there (what reached MLflow, whether the run stopped on request): Ray Train's
result only carries the metrics of the last checkpoint.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NAMESPACE = "rayclip-control"
POLL_S = 1.0


class RunControl:
    """Ray actor: whether the job's driver asked the run to stop (held by the driver; no CPU)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.end: dict = {}

    def request_stop(self, reason: str) -> None:
        self.reason = self.reason or reason

    def stop_reason(self) -> str | None:
        return self.reason

    def report_end(self, end: dict) -> None:
        self.end = dict(end)

    def end_report(self) -> dict:
        return self.end


def control_name(run_name: str) -> str:
    return f"rayclip-control-{run_name}"


def start_control(run_name: str):
    """The run's control actor, created by the driver (it lives as long as the driver holds the handle)."""
    import ray

    return ray.remote(RunControl).options(name=control_name(run_name), namespace=NAMESPACE, num_cpus=0).remote()


class DriverLink:
    """A worker's side: whether the driver asked this run to stop (every rank calls :meth:`stop_requested` before
    each step), and the end report (rank 0)."""

    def __init__(self, run_name: str, rank: int, device: torch.device | str = "cpu"):
        self.reason: str | None = None
        self.device = device
        self._stop = threading.Event()
        self._actor = None
        if rank == 0:
            self._actor = self._find(run_name)
            if self._actor is not None:
                threading.Thread(target=self._poll, name="rayclip-stop-watch", daemon=True).start()

    @staticmethod
    def _find(run_name: str):
        import ray

        try:
            return ray.get_actor(control_name(run_name), namespace=NAMESPACE)
        except ValueError:  # a run without a rayclip driver (a Tune trial, a test): Ray's own stop applies
            return None

    def _poll(self) -> None:
        import ray

        while not self._stop.is_set():
            try:
                self.reason = ray.get(self._actor.stop_reason.remote(), timeout=30)
            except Exception:  # noqa: BLE001 (the driver is gone: Ray ends this worker soon)
                return
            if self.reason:
                return
            self._stop.wait(POLL_S)

    def stop_requested(self) -> bool:
        """Collective: True on every rank once rank 0 has seen a stop request."""
        import torch  # here, not at the top: the driver's actor of this module never needs torch

        from orchestrator.collectives import all_reduce_sum

        flag = torch.tensor([1.0 if self.reason else 0.0], device=self.device)  # NCCL reduces device tensors only
        return bool(all_reduce_sum(flag).item() > 0)

    def report_end(self, end: dict) -> None:
        """Rank 0: leave the run's end report for the driver (nothing without a driver)."""
        import ray

        if self._actor is not None:
            ray.get(self._actor.report_end.remote(end), timeout=60)

    def close(self) -> None:
        self._stop.set()
