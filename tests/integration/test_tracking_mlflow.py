"""RunTracker against a real `mlflow server` subprocess (sqlite backend + proxied artifacts), everything
checked back through MlflowClient; the local-store cases are in tests/unit/test_tracking_store.py."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from mlflow import MlflowClient

from harness.local_servers import free_port, stop, wait_until_serving
from orchestrator.eval import EvalResult
from orchestrator.tracking import MAX_PARAM_VALUE_CHARS, RunTracker, flatten_config
from tests.factories import TrackingSettings as Settings
from tests.factories import artifact_paths, assert_registered, rayclip_records, write_export_file

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server on 127.0.0.1 with a sqlite backend and artifacts proxied into tmp."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log_path = root / "server.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{uri}/health", proc, name="mlflow server", timeout_s=90, log_path=log_path)
        yield uri
    finally:
        stop(proc)


def _config(model_name: str = "RN50", lr: float = 5e-4) -> dict:
    """A config shaped like the real one: nested sections, more than one log_batch of params."""
    return {
        "model": {"name": model_name, "quick_gelu": False},
        "optim": {"lr": lr, "betas": [0.9, 0.98], "weight_decay": 0.2},
        "data": {"shards": "s3://bucket/train-{000000..000099}.tar", "notes": "n" * 7000},
        "sweep": {f"knob_{i:03d}": i for i in range(150)},
    }


def _zero_shot(top1: float, confusion: np.ndarray, classes: list[str]) -> EvalResult:
    """A zero-shot result as the evaluation reports it (only what tracking reads is filled in)."""
    recall = np.diag(confusion) / confusion.sum(axis=1)
    return EvalResult("heldout", "zeroshot", {"zeroshot_top1": top1, "zeroshot_top5": 1.0}, int(confusion.sum()),
                      class_names=classes, confusion=confusion, per_class=dict(zip(classes, recall.tolist())))


def _assert_png(client: MlflowClient, run_id: str, artifact: str, dst: Path) -> None:
    local = client.download_artifacts(run_id, artifact, dst_path=str(dst))
    height, width, _ = imread(local).shape
    assert height > 100 and width > 100


def test_full_run_against_server(mlflow_server, tmp_path):
    settings = Settings(uri=mlflow_server, experiment="full", run_name="rn50-full",
                        register_model_name="rayclip-full", system_metrics=True)
    tracker = RunTracker.from_config(settings, system_metrics_interval_s=0.2)
    config = _config()
    run_id = tracker.start(config, "model:\n  name: RN50\n", world_size=4)
    assert run_id is not None
    for step in range(3):
        tracker.log_metrics({"loss": 2.0 - step, "lr": 1e-4 * step, "logit_scale": 14.3}, step=step)
    tracker.log_metrics({"loss": float("nan"), "lr": 3e-4}, step=3)
    classes = ["t-shirt", "trouser", "bag"]
    tracker.log_evaluation(_zero_shot(0.4, np.array([[3, 1, 0], [0, 4, 0], [2, 0, 2]]), classes), 10,
                           {"zero_shot_top1": 0.4})
    tracker.log_evaluation(_zero_shot(0.6, np.diag([4, 4, 4]), classes), 20, {"zero_shot_top1": 0.6})
    time.sleep(1.0)  # let the system-metrics sampler take a few samples
    state = write_export_file(tmp_path / "clip_rn50.pt")
    tracker.finish(str(tmp_path / "clip_rn50.pt"))

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "rn50-full"
    assert run.data.tags["model"] == "RN50" and run.data.tags["world_size"] == "4"
    expected = flatten_config(config)
    assert set(run.data.params) == set(expected) and len(expected) > 100
    assert run.data.params["optim.lr"] == "0.0005"
    assert len(run.data.params["data.notes"]) == MAX_PARAM_VALUE_CHARS
    loss = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in loss] == [(0, 2.0), (1, 1.0), (2, 0.0)]
    assert run.data.metrics["tracking/non_finite_skipped"] == 1.0
    assert run.data.metrics["zero_shot_top1"] == 0.6 and run.data.metrics["eval/heldout/zeroshot_top1"] == 0.6
    assert any(key.startswith("system/") for key in run.data.metrics)
    _assert_run_artifacts(client, run_id, tmp_path, state)
    assert_registered(client, "rayclip-full", run_id)


def _assert_run_artifacts(client: MlflowClient, run_id: str, tmp_path: Path, state: dict) -> None:
    assert artifact_paths(client, run_id) == {
        "config.yaml", "model/clip_rn50.pt", "eval/heldout/curve.png",
        "eval/heldout/confusion_step_00000010.png", "eval/heldout/confusion_step_00000020.png",
        "eval/heldout/per_class_step_00000010.png", "eval/heldout/per_class_step_00000020.png",
    }
    config_yaml = client.download_artifacts(run_id, "config.yaml", dst_path=str(tmp_path / "cfg"))
    assert Path(config_yaml).read_text() == "model:\n  name: RN50\n"
    _assert_png(client, run_id, "eval/heldout/curve.png", tmp_path / "acc")
    _assert_png(client, run_id, "eval/heldout/confusion_step_00000020.png", tmp_path / "cm")
    model_file = client.download_artifacts(run_id, "model/clip_rn50.pt", dst_path=str(tmp_path / "dl"))
    loaded = torch.load(model_file, weights_only=True)
    assert torch.equal(loaded["text_projection"], state["text_projection"])


def test_resume_continues_the_same_run(mlflow_server, tmp_path, caplog):
    settings = Settings(uri=mlflow_server, experiment="resume", register_model_name="rayclip-resume")
    first = RunTracker.from_config(settings)
    run_id = first.start(_config(lr=5e-4), "first: yaml\n")
    first.log_metrics({"loss": 3.0}, step=0)
    first.log_evaluation(_zero_shot(0.1, np.eye(2), ["a", "b"]), 0)
    first.finish(None, status="FAILED")  # the job died; Ray restarts it from a checkpoint

    second = RunTracker.from_config(settings)
    config = _config(lr=1e-4) | {"checkpoint": {"resumed_from": "step_1"}}
    with rayclip_records(caplog) as records:
        assert second.start(config, "second: yaml\n", resume_run_id=run_id) == run_id
    second.log_metrics({"loss": 2.0}, step=1)
    second.log_evaluation(_zero_shot(0.3, np.eye(2), ["a", "b"]), 1)
    assert second.evaluation_history == {"heldout": [(0, 0.1), (1, 0.3)]}  # the curve keeps the first attempt's point
    write_export_file(tmp_path / "clip_rn50.pt")
    second.finish(str(tmp_path / "clip_rn50.pt"))

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [3.0, 2.0]
    assert run.data.params["optim.lr"] == "0.0005"  # MLflow params are immutable
    assert run.data.params["checkpoint.resumed_from"] == "step_1"
    assert any("optim.lr" in r.getMessage() for r in records)
    config_yaml = client.download_artifacts(run_id, "config.yaml", dst_path=str(tmp_path / "cfg"))
    assert Path(config_yaml).read_text() == "second: yaml\n"
    assert len(client.search_runs([client.get_experiment_by_name("resume").experiment_id])) == 1
    assert_registered(client, "rayclip-resume", run_id)
