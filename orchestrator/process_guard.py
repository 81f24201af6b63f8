"""A guard process that stops a local Ray whose driver died without stopping it (SIGKILL, the OOM killer).

``ray.init`` ties the processes it starts (GCS, raylet, dashboard, monitors) to the driver's life with
PR_SET_PDEATHSIG, and the workers follow their raylet within seconds, but the raylet's agents (DashboardAgent,
RuntimeEnvAgent) only notice a minute later (Ray 2.60). So the driver (``ray_start``) starts a guard, in its
own session, whose standard input is a pipe only the driver holds open. Every second the guard records those
processes and their descendants as ``psutil.Process`` objects (PID and create time, so a PID the system has
since given to another process is never hit). At end of file (the driver is gone), or once the node's own
processes are all gone (``ray.shutdown``), it stops the recorded processes still running, SIGTERM first and
SIGKILL after a grace period, and exits. It never looks a process up by name.

A leaf: it imports nothing of rayclip's.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import psutil

POLL_S = 1.0  # a worker started since the last look still dies with its raylet, within seconds
GRACE_S = 2.0  # between SIGTERM and SIGKILL
_guard: subprocess.Popen | None = None  # its stdin is the pipe, open for as long as this process lives


def guard_processes(pids: Iterable[int]) -> None:
    """Have the processes ``pids`` and their descendants stopped when this process ends without stopping them.

    Starts the guard and returns at once; the guard prints nothing and ends with this process, or earlier
    once ``pids`` have all exited. Without any of ``pids`` running, no guard is started.
    """
    global _guard
    running = [_identity(process) for process in _processes(pids)]
    if running:
        # A session of its own: Ctrl-C or a hang-up reaches only the driver, which shuts Ray down itself; no
        # output streams, so a pipe reading the driver's output ends when the driver does.
        # The identities travel as a Python literal, not argv: library code reads no command line.
        _guard = subprocess.Popen([sys.executable, "-c", f"from {__name__} import main; main({running!r})"],
                                  cwd=Path(__file__).resolve().parents[1],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)


def main(identities: list[str]) -> None:
    """The guard: watch standard input while recording the processes ``pid@create_time`` and their descendants."""
    candidates = _processes(int(identity.partition("@")[0]) for identity in identities)
    node = {process for process in candidates if _identity(process) in identities}
    recorded = _running_with_descendants(node)
    while recorded & node and not _closed(sys.stdin.fileno(), POLL_S):
        recorded = _running_with_descendants(recorded)
    _stop(_running_with_descendants(recorded))


def _identity(process: psutil.Process) -> str:
    return f"{process.pid}@{process.create_time()!r}"


def _processes(pids: Iterable[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found.append(psutil.Process(pid))
    return found


def _running_with_descendants(recorded: set[psutil.Process]) -> set[psutil.Process]:
    """Those of ``recorded`` still running, with every descendant they have now."""
    by_parent: dict[int, list[psutil.Process]] = defaultdict(list)
    for process in _processes(psutil.pids()):
        with contextlib.suppress(psutil.Error):
            by_parent[process.ppid()].append(process)
    found = {process for children in by_parent.values() for process in children if process in recorded}
    unvisited = list(found)
    while unvisited:
        for child in by_parent[unvisited.pop().pid]:
            if child not in found:
                found.add(child)
                unvisited.append(child)
    return found


def _closed(pipe: int, timeout_s: float) -> bool:
    """Whether the writing end of ``pipe`` is closed, waiting up to ``timeout_s`` to find out."""
    readable, _, _ = select.select([pipe], [], [], timeout_s)
    return bool(readable) and not os.read(pipe, 1024)


def _stop(processes: set[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, lingering = psutil.wait_procs(list(processes), timeout=GRACE_S)
    for process in lingering:
        with contextlib.suppress(psutil.Error):
            process.kill()

