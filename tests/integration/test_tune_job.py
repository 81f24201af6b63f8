"""``jobs/tune.py`` end to end: a real search of four pretraining trials on local Ray, its driver killed and resumed.

The grid puts the trials in a known order (16 steps each): a good learning rate, one too small (ASHA stops it at
the first rung, 4 steps, behind the first), another good one (the driver is killed while it runs), and one so large the loss
diverges (the non-finite abort: the trial fails, the search goes on). Local Ray is sized for one trial at a
time, so a stopped trial that kept its workers would leave the next one waiting forever.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from orchestrator.config import load_config
from tests.factories import artifact_paths, metric_history

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
LEARNING_RATES = [1.0e-3, 1.0e-6, 2.0e-3, 1000.0]  # finished, stopped early, killed + resumed, diverges
METRIC = "eval/heldout-loss/contrastive_loss"


def tune_command(shards: str, work: Path, *extra: str) -> list[str]:
    sets = f"[{{name: heldout-loss, data: {shards}, task: contrastive-loss, every_steps: 4, max_images: 256}}]"
    space = f"{{optim.lr: {{kind: grid, values: {LEARNING_RATES}}}, " \
            "loss.init_temperature: {kind: loguniform, low: 0.03, high: 0.1}}"
    overrides = [f"data.shards={shards}", "data.decode_concurrency=1", "data.shuffle_buffer=256",
                 "deepspeed.micro_batch_size=64", "schedule.total_steps=16", "schedule.warmup_steps=2",
                 "checkpoint.every_steps=4", f"checkpoint.storage_path={work / 'searches'}",
                 f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.log_every_steps=1",
                 "eval.every_steps=4", "eval.max_images=256", f"eval.sets={sets}", "loss.max_nonfinite_in_row=2",
                 f"tune.metric={METRIC}", "tune.num_samples=1", "tune.grace_period=4", "tune.seed=0",
                 f"tune.search_space={space}"]
    command = [sys.executable, str(REPO_ROOT / "jobs" / "tune.py")]
    for override in overrides:
        command += ["--set", override]
    return command + list(extra)


def job_env() -> dict[str, str]:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def wait_for_line(log: Path, pattern: str, process: subprocess.Popen, timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found
        assert process.poll() is None, f"the search ended early:\n{log.read_text()[-4000:]}"
        time.sleep(2)
    raise AssertionError(f"no {pattern!r} within {timeout_s} s:\n{log.read_text()[-4000:]}")


def kill_with_descendants(process: subprocess.Popen) -> None:
    """SIGKILL the driver, as a lost head node would, then stop what it started (by PID) that outlived it."""
    started = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    time.sleep(5)  # Ray's own processes notice the dead node and exit; stop the ones that do not
    for child in started:
        if child.is_running():
            child.terminate()
    psutil.wait_procs([c for c in started if c.is_running()], timeout=15)


def test_search_stops_fails_survives_its_driver_and_writes_a_runnable_best_config(fashion_mnist_shards, tmp_path):
    log = tmp_path / "first.log"
    with log.open("w") as handle:
        first = subprocess.Popen(tune_command(fashion_mnist_shards, tmp_path), cwd=tmp_path, env=job_env(),
                                 stdout=handle, stderr=subprocess.STDOUT)
    try:
        name = wait_for_line(log, r"search (rayclip-tune-\d{8}-\d{6}-[0-9a-f]{4})", first, 120).group(1)
        wait_for_line(log, r"trial \S+_00001 stopped early by ASHA at step 4", first, 900)
        wait_for_line(log, r"trial \S+_00002 started", first, 300)
        time.sleep(10)  # the third trial is under way when the driver dies
    finally:
        kill_with_descendants(first)
    resumed = subprocess.run(tune_command(fashion_mnist_shards, tmp_path, "--resume", name), cwd=tmp_path,
                             env=job_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    out = resumed.stdout + resumed.stderr
    assert re.search(r"trial \S+_00000 reached its first step (\d+ min )?\d+ s after it started", log.read_text())
    assert "_00000 started" not in out and "_00001 started" not in out  # done before the kill: not rerun
    # Tune's banner (a TensorBoard folder in Ray's temp dir) and Ray's lines about its own actors stay out
    noise = ["Configuration for experiment", "tensorboard --logdir", "ray-project/ray/issues/53727",
             "Detected that the Ray Train controller actor", "PYTHON worker processes have been started"]
    assert [line for line in out.splitlines() if any(n in line for n in noise)] == []

    table = {line.split()[0].rsplit("_", 1)[-1]: line.split() for line in resumed.stdout.splitlines()
             if line.startswith(f"{name}-")}
    assert sorted(table) == ["00000", "00001", "00002", "00003"]
    assert [table[t][-3] for t in ("00000", "00002")] == ["finished", "finished"]
    assert table["00001"][-4:-2] == ["stopped", "early"] and table["00003"][-3] == "failed"

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("rayclip-tune")  # configs/tune_local.yaml's tracking.experiment
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    parent = runs[name]
    assert parent.info.status == "FINISHED" and parent.data.tags["rayclip.kind"] == "tune-search"
    assert parent.data.metrics["trials/finished"] == 2 and parent.data.metrics["trials/failed"] == 1
    children = {run_name.rsplit("_", 1)[-1]: run for run_name, run in runs.items() if run_name != name}
    assert sorted(children) == ["00000", "00001", "00002", "00003"]  # one MLflow run a trial, resumed or not
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in children.values())
    assert [children[t].info.status for t in ("00000", "00001", "00002", "00003")] == [
        "FINISHED", "KILLED", "FINISHED", "FAILED"]
    assert children["00001"].data.tags["rayclip.trial_outcome"] == "stopped early by ASHA at step 4"
    assert "NonFiniteLossError" in children["00003"].data.tags["rayclip.failure"]
    # Stopped at step 4, the trial's Train run ends within seconds (left alone it would train all 16 steps,
    # holding its workers); a couple of sub-second steps may pass before its actor is killed.
    stopped = metric_history(uri, children["00001"].info.run_id, "train/loss")
    assert 4 <= max(stopped) < 12, f"the stopped trial trained on: steps {sorted(stopped)}"
    assert sorted(metric_history(uri, children["00000"].info.run_id, "train/loss")) == list(range(1, 17))
    assert {"best_config.yaml", "search/trial_curves.png", "search/metric_vs_optim.lr.png",
            "search/metric_vs_loss.init_temperature.png"} <= artifact_paths(client, parent.info.run_id)

    best_path = Path(re.search(r"best config \(.*\): (\S+best_config\.yaml)", resumed.stdout).group(1))
    best = load_config(best_path)
    assert best.tune is None and best.optim.lr in (1.0e-3, 2.0e-3)
    run = subprocess.run([sys.executable, str(REPO_ROOT / "jobs" / "pretrain.py"), "--config", str(best_path),
                          "--set", "schedule.stop_after_steps=2", "--set", "eval.enabled=false"],
                         cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"run: \S+-best-\d{8}-\d{6}-[0-9a-f]{4} \(2/16 steps\)", run.stdout), run.stdout[-2000:]
