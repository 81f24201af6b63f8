"""The autoscaling path end to end: ``ray job submit`` to a head whose autoscaler adds and removes nodes.

``clusters/local_autoscaling.yaml`` (Ray's fake multi-node provider, on free ports here) starts with a head
only; training workers need the ``trainer`` resource that only autoscaled nodes offer. The pretraining job
asks for 2 workers, so the autoscaler must add at least 2 nodes; the job trains and succeeds; once idle,
every added node is removed. Everything this test starts is stopped by its own PID or by its unique GCS port (the fake
nodes are raylets the head's autoscaler spawned), never by ``ray stop``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from harness.local_servers import free_port, stop_ray_head, submit_job, wait_until_serving
from orchestrator.train import DEFAULT_EXTENSIONS_DIR

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def _nodes(gcs_address: str, env: dict) -> list[dict]:
    """Every node the cluster has had, alive or dead, from Ray's state API (``ray list nodes``)."""
    listed = subprocess.run(["ray", "list", "nodes", f"--address={gcs_address}", "--format=json", "--detail"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stdout[-2000:] + listed.stderr[-2000:]
    if "No resource in the cluster" in listed.stdout:  # what it prints for an empty list
        return []
    return json.loads(listed.stdout[listed.stdout.index("["):])


def _trainer_nodes(nodes: list[dict]) -> dict[str, str]:
    return {node["node_id"]: node["state"] for node in nodes if node.get("resources_total", {}).get("trainer")}


def _stop_cluster(head: subprocess.Popen, gcs_port: int, temp_dir: str) -> None:
    stop_ray_head(head, gcs_port)
    marker = f"127.0.0.1:{gcs_port}"
    leftovers = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.pid != os.getpid() and (marker in cmdline or temp_dir in cmdline):
            leftovers.append(process)
    for process in leftovers:
        process.terminate()
    _, alive = psutil.wait_procs(leftovers, timeout=15)
    for process in alive:
        process.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_submitted_job_makes_the_autoscaler_add_nodes_which_go_when_idle(fashion_mnist_shards, tmp_path):
    gcs_port, dashboard_port = free_port(), free_port()
    config = yaml.safe_load((REPO_ROOT / "clusters" / "local_autoscaling.yaml").read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs_port}"
    config_path = tmp_path / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(config))
    temp_dir = tempfile.mkdtemp(prefix="rc-as-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         f"--num-cpus={config['available_node_types']['ray.head.default']['resources']['CPU']}",
         f"--autoscaling-config={config_path}", f"--temp-dir={temp_dir}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_until_serving(address + "/api/version", head, name="ray start", timeout_s=120, http_error_means_up=True)
        assert _trainer_nodes(_nodes(f"127.0.0.1:{gcs_port}", env)) == {}  # a head only: nothing offers "trainer" yet
        # one read task at a time: with Ray Data's default, read tasks took all 3 head CPUs and the decode actor
        # waited for a node the autoscaler would only start for "trainer" work (the Dataset failed)
        overrides = [f"data.shards={fashion_mnist_shards}", "data.decode_concurrency=1", "data.read_concurrency=1",
                     "data.shuffle_buffer=256",
                     "deepspeed.micro_batch_size=32", "schedule.warmup_steps=1", "schedule.total_steps=4",
                     "checkpoint.every_steps=2", "scaling.num_workers=2", "scaling.extra_resources={trainer: 1}",
                     f"checkpoint.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                     "eval.enabled=false"]
        extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(DEFAULT_EXTENSIONS_DIR))
        run = submit_job(address, ["python", "jobs/pretrain.py", *[arg for o in overrides for arg in ("--set", o)]],
                         env, REPO_ROOT, runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": extensions}})
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-4000:]
        assert "succeeded" in output and "(4/4 steps)" in output
        assert "it waits until an autoscaler adds them" in output  # the driver said why it waited
        # Ray's own actors run under the noise policy on a joined cluster too, and know its address. Ray Train may
        # log a traceback of its own when a worker dies as it starts (as on a node the autoscaler replaces) and start the
        # group again; no frame of a traceback may lie in rayclip's code or in Ray's placement-group cleaner.
        assert "DeprecationWarning" not in output, output[-4000:]
        frames = re.findall(r'File "([^"]+)", line \d+', output)
        assert not [f for f in frames if re.search(r"/(orchestrator|jobs|models)/|placement_group_cleaner", f)], frames

        added = _trainer_nodes(_nodes(f"127.0.0.1:{gcs_port}", env))
        # the 2 training workers' nodes at least (the data stream's CPU requests may bring one more, and a node
        # idle between the stream's start and the workers' placement may be replaced)
        assert len(added) >= 2, added
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and any(state == "ALIVE" for state in added.values()):
            time.sleep(3)
            added = _trainer_nodes(_nodes(f"127.0.0.1:{gcs_port}", env))
        assert added and all(state == "DEAD" for state in added.values()), added  # idle nodes were removed
    finally:
        _stop_cluster(head, gcs_port, temp_dir)
