"""RunTracker against real MLflow: a `mlflow server` subprocess (sqlite + proxied artifacts) and the
default embedded sqlite store, everything checked back through MlflowClient."""

import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from mlflow import MlflowClient

from orchestrator.tracking import MAX_PARAM_VALUE_CHARS, RunTracker, flatten_config
from tests.local_servers import free_port, stop, wait_until_serving

pytestmark = pytest.mark.integration


@dataclass
class Settings:
    uri: str
    experiment: str
    run_name: str | None = None
    register_model_name: str | None = None
    log_every_steps: int = 1
    system_metrics: bool = False


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


def _export_state_dict(path: Path) -> dict:
    state = {"logit_scale": torch.tensor(4.6052), "text_projection": torch.randn(8, 4)}
    torch.save(state, path)
    return state


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for info in client.list_artifacts(run_id, path):
        found |= _artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return found


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
    tracker.log_zero_shot(10, 0.4, 0.9, np.array([[3, 1, 0], [0, 4, 0], [2, 0, 2]]), classes)
    tracker.log_zero_shot(20, 0.6, 1.0, np.diag([4, 4, 4]), classes)
    time.sleep(1.0)  # let the system-metrics sampler take a few samples
    state = _export_state_dict(tmp_path / "clip_rn50.pt")
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
    assert run.data.metrics["zero_shot_top1"] == 0.6
    assert any(key.startswith("system/") for key in run.data.metrics)
    _assert_run_artifacts(client, run_id, tmp_path, state)
    _assert_registered(client, "rayclip-full", run_id)


def _assert_run_artifacts(client: MlflowClient, run_id: str, tmp_path: Path, state: dict) -> None:
    assert _artifact_paths(client, run_id) == {
        "config.yaml", "model/clip_rn50.pt", "zero_shot/accuracy.png",
        "zero_shot/confusion_step_00000010.png", "zero_shot/confusion_step_00000020.png",
    }
    config_yaml = client.download_artifacts(run_id, "config.yaml", dst_path=str(tmp_path / "cfg"))
    assert Path(config_yaml).read_text() == "model:\n  name: RN50\n"
    _assert_png(client, run_id, "zero_shot/accuracy.png", tmp_path / "acc")
    _assert_png(client, run_id, "zero_shot/confusion_step_00000020.png", tmp_path / "cm")
    model_file = client.download_artifacts(run_id, "model/clip_rn50.pt", dst_path=str(tmp_path / "dl"))
    loaded = torch.load(model_file, weights_only=True)
    assert torch.equal(loaded["text_projection"], state["text_projection"])


def _assert_registered(client: MlflowClient, name: str, run_id: str) -> None:
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1
    assert versions[0].run_id == run_id
    assert versions[0].source == f"runs:/{run_id}/model"
    assert versions[0].tags["state_dict_file"] == "clip_rn50.pt"


def test_resume_continues_the_same_run(mlflow_server, tmp_path, caplog):
    settings = Settings(uri=mlflow_server, experiment="resume", register_model_name="rayclip-resume")
    first = RunTracker.from_config(settings)
    run_id = first.start(_config(lr=5e-4), "first: yaml\n")
    first.log_metrics({"loss": 3.0}, step=0)
    first.log_zero_shot(0, 0.1, 0.5, np.eye(2), ["a", "b"])
    first.finish(None, status="FAILED")  # the job died; Ray restarts it from a checkpoint

    caplog.set_level(logging.WARNING, logger="orchestrator.tracking")
    second = RunTracker.from_config(settings)
    config = _config(lr=1e-4) | {"checkpoint": {"resumed_from": "step_1"}}
    assert second.start(config, "second: yaml\n", resume_run_id=run_id) == run_id
    assert second.zero_shot_history == [(0, 0.1, 0.5)]
    second.log_metrics({"loss": 2.0}, step=1)
    second.log_zero_shot(1, 0.3, 0.7, np.eye(2), ["a", "b"])
    _export_state_dict(tmp_path / "clip_rn50.pt")
    second.finish(str(tmp_path / "clip_rn50.pt"))

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [3.0, 2.0]
    assert run.data.params["optim.lr"] == "0.0005"  # MLflow params are immutable
    assert run.data.params["checkpoint.resumed_from"] == "step_1"
    assert any("optim.lr" in r.getMessage() for r in caplog.records)
    config_yaml = client.download_artifacts(run_id, "config.yaml", dst_path=str(tmp_path / "cfg"))
    assert Path(config_yaml).read_text() == "second: yaml\n"
    assert len(client.search_runs([client.get_experiment_by_name("resume").experiment_id])) == 1
    _assert_registered(client, "rayclip-resume", run_id)


def test_default_sqlite_store_in_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    tracker = RunTracker.from_config(Settings(uri="sqlite:///mlflow.db", experiment="local",
                                              register_model_name="rayclip-local"))
    run_id = tracker.start({"model": {"name": "ViT-B/32"}}, "model: {name: ViT-B/32}\n")
    tracker.log_metrics({"loss": 1.5, "samples_per_s": 2.5}, step=0)
    _export_state_dict(tmp_path / "clip_rn50.pt")
    tracker.finish(str(tmp_path / "clip_rn50.pt"))

    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient("sqlite:///mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"loss": 1.5, "samples_per_s": 2.5}
    assert run.data.tags["model"] == "ViT-B/32"
    assert "model/clip_rn50.pt" in _artifact_paths(client, run_id)
    _assert_registered(client, "rayclip-local", run_id)


def test_store_failure_mid_run_warns_once_and_training_goes_on(monkeypatch, tmp_path, caplog):
    monkeypatch.chdir(tmp_path)
    tracker = RunTracker(uri="sqlite:///mlflow.db", experiment="broken")
    run_id = tracker.start({"model": {"name": "RN50"}}, "model: {name: RN50}\n")
    tracker.log_metrics({"loss": 1.0}, step=0)
    MlflowClient("sqlite:///mlflow.db").delete_run(run_id)  # the store now rejects writes to this run
    caplog.set_level(logging.WARNING, logger="orchestrator.tracking")
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    tracker.finish(None)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sqlite:///mlflow.db" in warnings[0].getMessage()
    assert not tracker.active


def test_resume_of_an_unknown_run_starts_a_new_one(monkeypatch, tmp_path, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="orchestrator.tracking")
    tracker = RunTracker(uri="sqlite:///mlflow.db", experiment="fresh")
    run_id = tracker.start({"model": {"name": "RN50"}}, "x: 1\n", resume_run_id="0" * 32)
    assert run_id is not None and run_id != "0" * 32
    assert any("not found" in r.getMessage() for r in caplog.records)
    tracker.finish(None)
    assert MlflowClient("sqlite:///mlflow.db").get_run(run_id).info.status == "FINISHED"
