"""A killed worker node is survived: Ray Train restarts the workers and the run finishes from its checkpoint.

The scenario runs in a subprocess with its own ``ray.cluster_utils.Cluster`` (a head for the data stream
and the controller, two 1-CPU nodes that alone offer the ``trainer`` resource the training workers
need), so it does not disturb the session's shared Ray. Once the step-4 checkpoint is complete in storage,
one training node is removed and a fresh one added. The run is long enough (32 steps, a checkpoint every 4)
that it is still training when the node goes, however fast the machine: the restarted workers must resume
from the newest checkpoint written before the loss (step 4 or a later one), log the steps up to it once only,
and end the run at its last step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TOTAL_STEPS = 32


def _scenario(config_json: str, out_path: str) -> None:
    import ray
    from mlflow import MlflowClient
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from orchestrator.config import RunConfig
    from orchestrator.train import build_trainer

    cfg = RunConfig.from_dict(json.loads(config_json))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    nodes = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    first_manifest = Path(cfg.checkpoint.storage_path) / cfg.name / "checkpoint_step_00000004" / "manifest.json"

    def checkpoint_complete() -> bool:
        return first_manifest.exists()

    outcome: dict = {}

    def fit() -> None:
        try:
            result = build_trainer(cfg).fit()
            outcome.update(step=result.metrics["step"], run_id=result.metrics["mlflow_run_id"])
        except Exception as error:  # reported to the test, which fails with it
            outcome["error"] = repr(error)

    thread = threading.Thread(target=fit)
    thread.start()
    deadline = time.monotonic() + 300
    while not checkpoint_complete() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    outcome["killed"] = checkpoint_complete() and thread.is_alive()
    if outcome["killed"]:
        cluster.remove_node(nodes[1])
        cluster.add_node(num_cpus=1, resources={"trainer": 1})
    # The stream's bookkeeping actors must not live where training does, or a node loss takes them along.
    control = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.name.startswith("rayclip-")]
    outcome["control_actors"] = sorted(a.name.rsplit("-", 1)[0] for a in control)
    outcome["control_actors_off_head"] = [a.name for a in control if a.node_id != cluster.head_node.node_id]
    thread.join(timeout=400)
    if "run_id" in outcome:
        history = MlflowClient(tracking_uri=cfg.tracking.uri).get_metric_history(outcome["run_id"], "train/loss")
        outcome["logged_steps"] = sorted(m.step for m in history)
    Path(out_path).write_text(json.dumps(outcome))
    ray.shutdown()
    cluster.shutdown()


def test_killed_worker_node_is_survived(tiny_run_config, tmp_path):
    cfg = tiny_run_config("scaling.extra_resources={trainer: 1}", "checkpoint.max_failures=2", "eval.enabled=false",
                          f"schedule.total_steps={TOTAL_STEPS}")
    out_path = tmp_path / "outcome.json"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    run = subprocess.run(
        [sys.executable, __file__, cfg.model_dump_json(), str(out_path)],
        env=env, cwd=REPO_ROOT, timeout=600, capture_output=True, text=True,
    )
    (tmp_path / "scenario.log").write_text(run.stdout + run.stderr)  # the whole story, for a failure
    assert run.returncode == 0, f"see {tmp_path / 'scenario.log'}: " + run.stderr[-3000:]
    outcome = json.loads(out_path.read_text())
    assert outcome["killed"], outcome
    assert any(name.startswith("rayclip-stream-registry") for name in outcome["control_actors"]), outcome
    assert any(name.startswith("rayclip-data-monitor") for name in outcome["control_actors"]), outcome
    assert outcome["control_actors_off_head"] == [], outcome
    assert "error" not in outcome, outcome["error"]
    assert outcome["step"] == TOTAL_STEPS
    resumed = re.findall(r"resumed from \S+checkpoint_step_(\d+) at step (\d+)", run.stdout + run.stderr)
    assert len(resumed) == 1, f"one restart expected, see {tmp_path / 'scenario.log'}: {resumed}"
    resumed_step = int(resumed[0][1])
    assert int(resumed[0][0]) == resumed_step and 4 <= resumed_step < TOTAL_STEPS, resumed
    logged = outcome["logged_steps"]
    assert set(logged) == set(range(1, TOTAL_STEPS + 1))
    assert all(logged.count(step) == 1 for step in range(1, resumed_step + 1)), logged  # up to the checkpoint: once


if __name__ == "__main__":
    _scenario(sys.argv[1], sys.argv[2])
