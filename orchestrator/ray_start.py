"""Joining the cluster of ``ray job submit``, or starting a local Ray for this checkout (every job's driver).

A leaf: it imports nothing of rayclip's but ``logs``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from orchestrator.logs import RAY_NOISE, drop_forwarded_lines, get_logger, quiet_ray_driver

REPO_ROOT = Path(__file__).resolve().parents[1]
GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"  # read by Ray when ray.init starts a head node
logger = get_logger("ray")


def start_ray(needed_cpus: int, *, what: str, shortfall_hint: str) -> None:
    """Join the cluster when ``RAY_ADDRESS`` is set (``ray job submit``), else start a local Ray.

    A local Ray gets this checkout on its workers' PYTHONPATH (under ``ray job submit --working-dir`` Ray
    ships the code itself) and at least ``needed_cpus`` logical CPUs, so that everything the job runs at
    once is scheduled on a 2-core laptop too; ``what`` says what they are for (the log line), and
    ``shortfall_hint`` what to change when a joined cluster has fewer.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING")
        drop_forwarded_lines(*RAY_NOISE)
        available = ray.cluster_resources().get("CPU", 0)
        if available < needed_cpus:
            logger.warning("the cluster has %g CPUs now and this job needs %d (%s): it waits until an autoscaler "
                           "adds them; a fixed cluster never will (%s)", available, needed_cpus, what, shortfall_hint)
        return
    quiet_ray_driver()
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    num_cpus = max(os.cpu_count() or 1, needed_cpus)
    # The GCS on a port chosen here, so every worker can be told its cluster's address: Ray's state API (which
    # Ray Train's placement-group cleaner uses) otherwise guesses it, and with another Ray on the machine it
    # gives up ("Found multiple active Ray instances"), leaving a stopped run's workers reserved.
    address = f"{ray.util.get_node_ip_address()}:{_free_port()}"
    os.environ[GCS_PORT_VARIABLE] = address.rsplit(":", 1)[1]
    try:
        ray.init(
            num_cpus=num_cpus,
            logging_level="WARNING",
            # Ray Data's per-dataset INFO lines (execution plans, log folders) are for debugging, and its progress
            # bars redraw over the job's own lines (every job prints its progress with an ETA itself).
            runtime_env={"env_vars": {"PYTHONPATH": python_path, "RAY_DATA_LOG_LEVEL": "WARNING",
                                      "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_ADDRESS": address},
                         "worker_process_setup_hook": "orchestrator.logs.quiet_ray_process"},
        )
    finally:
        os.environ.pop(GCS_PORT_VARIABLE, None)
    drop_forwarded_lines(*RAY_NOISE)
    logger.info("local Ray started (%d logical CPUs); %s", num_cpus, what)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
