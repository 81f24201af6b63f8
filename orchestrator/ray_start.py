"""Joining the cluster of ``ray job submit``, or starting a local Ray for this checkout (every job's driver).

A leaf: it imports nothing of rayclip's but ``logs``, ``noise`` and ``process_guard``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from orchestrator import noise
from orchestrator.logs import get_logger
from orchestrator.process_guard import guard_processes

REPO_ROOT = Path(__file__).resolve().parents[1]
GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"  # read by Ray when ray.init starts a head node
logger = get_logger("ray")


def start_ray(needed_cpus: int, *, what: str, shortfall_hint: str) -> None:
    """Join the cluster when ``RAY_ADDRESS`` is set (``ray job submit``), else start a local Ray.

    A local Ray gets this checkout on its workers' PYTHONPATH (under ``ray job submit --working-dir`` Ray
    ships the code itself) and at least ``needed_cpus`` logical CPUs, so that everything the job runs at
    once is scheduled on a 2-core laptop too; ``what`` says what they are for (the log line), and
    ``shortfall_hint`` what to change when a joined cluster has fewer. The processes of a local Ray are stopped
    when this driver dies without shutting it down (a guard process, ``process_guard``); nothing of a joined
    cluster ever is.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=noise.level_for("ray"), runtime_env=joined_runtime_env(os.environ))
        available = ray.cluster_resources().get("CPU", 0)
        if available < needed_cpus:
            logger.warning("the cluster has %g CPUs now and this job needs %d (%s): it waits until an autoscaler "
                           "adds them; a fixed cluster never will (%s)", available, needed_cpus, what, shortfall_hint)
        return
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
            logging_level=noise.level_for("ray"),
            runtime_env={"env_vars": {"PYTHONPATH": python_path, "RAY_ADDRESS": address,
                                      **noise.env_for(noise.RAY_PROCESS)},
                         "worker_process_setup_hook": "orchestrator.noise.install_ray_process"},
        )
    finally:
        os.environ.pop(GCS_PORT_VARIABLE, None)
    guard_processes(_started_here())
    logger.info("local Ray started (%d logical CPUs); %s", num_cpus, what)


def joined_runtime_env(environ) -> dict:
    """What a job that joins a cluster adds to its runtime_env: the noise policy's hook and variables (Ray Data's and
    Ray Train's own actors run under it, as on a local Ray) and the cluster's address for every worker (Ray's state
    API, which Ray Train's placement-group cleaner calls, otherwise guesses it and fails where a machine runs two Ray
    instances). Ray merges this with the runtime_env of ``ray job submit`` and refuses a key or variable set in both,
    so what the submitter set is left to it."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR  # set by Ray's job supervisor

    submitted = json.loads(environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}").get("runtime_env") or {}
    variables = dict(noise.env_for(noise.RAY_PROCESS))
    address = environ.get("RAY_ADDRESS", "")
    if address and "://" not in address and address != "auto":  # a GCS address (host:port), as jobs get it
        variables["RAY_ADDRESS"] = address
    taken = submitted.get("env_vars") or {}
    runtime_env: dict = {"env_vars": {name: value for name, value in variables.items() if name not in taken}}
    if "worker_process_setup_hook" not in submitted:
        runtime_env["worker_process_setup_hook"] = "orchestrator.noise.install_ray_process"
    return runtime_env


def _started_here() -> list[int]:
    """The PIDs of the Ray processes ``ray.init`` started in this driver (none where it joined a cluster)."""
    from ray._private import worker  # Ray keeps no public list of the processes ray.init started

    return [info.process.pid for infos in worker._global_node.all_processes.values() for info in infos]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
