"""Elastic training on ``ray.cluster_utils.Cluster``: a lost node shrinks the run, a returning one grows it back.

The scenario runs in a subprocess with its own cluster (a head for the data stream and the controller,
three 1-CPU nodes that alone offer the ``trainer`` resource), so it never competes with the suite's shared
Ray. The run has ``scaling.num_workers: [1, 3]`` and a global batch of 40 with micro-batches of 8: 3 workers
hold 14, 13 and 13 samples in 2 chunks (an uneven share, the loss weighted by rows), 2 workers 20 each in 3
chunks, 1 worker 40 in 5. Once the step-4 checkpoint is in storage one training node is
removed: Ray Train restarts the group on the 2 nodes left, from that checkpoint. Once a checkpoint written
by 2 workers is in storage a node is added back: within ``scaling.resize_check_s`` Ray Train grows the
group to 3 again, from the latest checkpoint. The run must end at its last step with every step's learning
rate on the schedule, the global batch unchanged (samples seen = steps x 40), the loss continuous across
both resizes, and no sample trained on twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TOTAL_STEPS = 80
GLOBAL_BATCH = 40


def _latest_world_size(run_dir: Path) -> int | None:
    """The worker count recorded by the run's newest checkpoint in storage."""
    states = sorted(run_dir.glob("checkpoint_*/train_state.json"))
    for state in reversed(states):
        try:
            return json.loads(state.read_text())["world_size"]
        except (ValueError, KeyError, OSError):
            continue
    return None


def _wait(condition, thread: threading.Thread, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return condition()


def _scenario(config_json: str, out_path: str) -> None:
    import ray
    from mlflow import MlflowClient
    from ray.cluster_utils import Cluster

    from orchestrator.config import RunConfig
    from orchestrator.train import build_trainer

    cfg = RunConfig.from_dict(json.loads(config_json))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    # every process of this cluster (Ray Train's placement-group cleaner too) asks for this cluster by address
    os.environ["RAY_ADDRESS"] = cluster.address
    nodes = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    run_dir = Path(cfg.checkpoint.storage_path) / cfg.name
    snapshot = run_dir / "checkpoint_manager_snapshot.json"

    def registered(step: int) -> bool:  # a checkpoint counts once Ray Train has registered it, not when written
        try:
            return f"checkpoint_step_{step:08d}" in snapshot.read_text()
        except (FileNotFoundError, ValueError):
            return False
    outcome: dict = {"events": []}

    def fit() -> None:
        try:
            result = build_trainer(cfg).fit()
            outcome.update(step=result.metrics["step"], run_id=result.metrics["mlflow_run_id"],
                           checkpoint=result.checkpoint.path)
        except Exception as error:  # reported to the test, which fails with it
            outcome["error"] = repr(error)

    thread = threading.Thread(target=fit)
    thread.start()
    if _wait(lambda: registered(4), thread, 300):
        cluster.remove_node(nodes[2])
        outcome["events"].append("node removed after the step-4 checkpoint")
        if _wait(lambda: _latest_world_size(run_dir) == 2, thread, 300):
            cluster.add_node(num_cpus=1, resources={"trainer": 1})
            outcome["events"].append("node added after a 2-worker checkpoint")
    thread.join(timeout=600)
    if "run_id" in outcome:
        client = MlflowClient(tracking_uri=cfg.tracking.uri)
        for key in ("train/loss", "train/lr", "train/samples_seen", "scaling/workers", "scaling/accumulation_chunks",
                    "scaling/resize_seconds_lost"):
            outcome[key] = [(m.step, m.timestamp, m.value) for m in client.get_metric_history(outcome["run_id"], key)]
        state = json.loads((Path(outcome["checkpoint"]) / "train_state.json").read_text())
        outcome["audit"] = state["data_position"]["audit"]
    Path(out_path).write_text(json.dumps(outcome))
    ray.shutdown()
    cluster.shutdown()


def _latest_per_step(history: list) -> dict[int, float]:
    """A step logged again after a restart keeps its newest value (what the run's final curve shows)."""
    latest: dict[int, tuple[int, float]] = {}
    for step, timestamp, value in history:
        if step not in latest or timestamp >= latest[step][0]:
            latest[step] = (timestamp, value)
    return {step: value for step, (_, value) in latest.items()}


def test_a_lost_node_shrinks_the_run_and_a_returning_node_grows_it(tiny_run_config, tmp_path):
    cfg = tiny_run_config("scaling.num_workers=[1, 3]", "scaling.extra_resources={trainer: 1}",
                          "scaling.resize_check_s=5", "deepspeed.micro_batch_size=8",
                          f"deepspeed.global_batch_size={GLOBAL_BATCH}", f"schedule.total_steps={TOTAL_STEPS}",
                          "checkpoint.max_failures=3", "checkpoint.num_to_keep=null", "checkpoint.audit_sample_ids=true",
                          "eval.enabled=false", "optim.lr=1e-3")
    out_path = tmp_path / "outcome.json"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    run = subprocess.run([sys.executable, __file__, cfg.model_dump_json(), str(out_path)],
                         env=env, cwd=REPO_ROOT, timeout=1200, capture_output=True, text=True)
    log = run.stdout + run.stderr
    (tmp_path / "scenario.log").write_text(log)  # the whole story, for a failure
    assert run.returncode == 0, f"see {tmp_path / 'scenario.log'}: " + run.stderr[-3000:]
    outcome = json.loads(out_path.read_text())
    assert "error" not in outcome, outcome["error"]
    assert outcome["events"] == ["node removed after the step-4 checkpoint", "node added after a 2-worker checkpoint"]
    assert outcome["step"] == TOTAL_STEPS

    # 3 workers, then 2, then 3 again, in time order; 2, 3 and 2 chunks of up to 8 make the same 40 a step
    sizes = [int(value) for _, _, value in sorted(outcome["scaling/workers"], key=lambda m: m[1])]
    phases = [size for index, size in enumerate(sizes) if index == 0 or size != sizes[index - 1]]
    assert phases == [3, 2, 3], sizes
    workers_at = {(step, timestamp): int(value) for step, timestamp, value in outcome["scaling/workers"]}
    chunks = {workers_at[(step, timestamp)]: int(value) for step, timestamp, value in outcome["scaling/accumulation_chunks"]}
    assert chunks == {3: 2, 2: 3}
    assert "resized from 3 to 2 workers" in log and "resized from 2 to 3 workers" in log
    assert "global batch 40 = 3 x 13-14 samples in 2 chunk(s)" in log and "global batch 40 = 2 x 20 samples in 3 chunk(s)" in log
    assert len(outcome["scaling/resize_seconds_lost"]) == 2
    assert all(0 < lost < 600 for _, _, lost in outcome["scaling/resize_seconds_lost"])

    # the schedule and the step count are exact; every step trained on the whole global batch
    samples = _latest_per_step(outcome["train/samples_seen"])
    assert sorted(samples) == list(range(1, TOTAL_STEPS + 1))
    assert all(samples[step] == step * GLOBAL_BATCH for step in samples)
    from orchestrator.train import lr_multiplier

    for step, lr in _latest_per_step(outcome["train/lr"]).items():
        expected = cfg.optim.lr * lr_multiplier(step, kind="cosine", warmup_steps=2, total_steps=TOTAL_STEPS)
        assert lr == pytest.approx(expected, rel=1e-6, abs=1e-12), step

    # the loss goes on where it was: across each resize it moves no more than between ordinary steps
    loss = _latest_per_step(outcome["train/loss"])
    ordered = sorted(outcome["scaling/workers"], key=lambda m: m[1])
    first_after = [ordered[i][0] for i in range(1, len(ordered)) if ordered[i][2] != ordered[i - 1][2]]
    jumps = {step: abs(loss[step] - loss[step - 1]) for step in range(2, TOTAL_STEPS + 1)}
    ordinary = [jump for step, jump in jumps.items() if step not in first_after]
    for step in first_after:
        assert jumps[step] <= 1.5 * max(ordinary), (step, jumps[step], max(ordinary))

    audit = outcome["audit"]
    assert len(audit) == TOTAL_STEPS * GLOBAL_BATCH
    assert len(set(audit)) == len(audit), "a sample was trained on twice"


if __name__ == "__main__":
    _scenario(sys.argv[1], sys.argv[2])
