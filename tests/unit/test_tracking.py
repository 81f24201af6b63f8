"""Unit tests for orchestrator/tracking/ that need no running MLflow store."""

import io
import logging
import os
import socket
import time

import numpy as np
import pytest
from matplotlib.image import imread

from orchestrator.tracking import (
    MAX_PARAM_VALUE_CHARS,
    MAX_PARAMS_PER_BATCH,
    RunTracker,
    flatten_config,
    param_batches,
    render_accuracy_curve,
    render_confusion_matrix,
)
from tests.factories import TrackingSettings as Settings
from tests.factories import rayclip_records

HTTP_ENV = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)


def closed_port_uri() -> str:
    """A localhost URL on which nothing listens (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_flatten_config_uses_dotted_keys_and_string_values():
    config = {"optim": {"lr": 3e-4, "betas": [0.9, 0.98]}, "model": {"name": "RN50", "vision": {"layers": 4}}}
    assert flatten_config(config) == {
        "optim.lr": "0.0003",
        "optim.betas": "[0.9, 0.98]",
        "model.name": "RN50",
        "model.vision.layers": "4",
    }


def test_flatten_config_keeps_empty_sections_and_none_visible():
    flat = flatten_config({"tune": {}, "tracking": {"run_name": None}})
    assert flat == {"tune": "{}", "tracking.run_name": "None"}


def test_param_batches_respect_mlflow_limits():
    params = {f"k{i:03d}": "v" for i in range(2 * MAX_PARAMS_PER_BATCH + 5)}
    params["long"] = "x" * (MAX_PARAM_VALUE_CHARS + 1)
    batches = param_batches(params)
    assert [len(b) for b in batches] == [MAX_PARAMS_PER_BATCH, MAX_PARAMS_PER_BATCH, 6]
    long_value = next(p.value for b in batches for p in b if p.key == "long")
    assert len(long_value) == MAX_PARAM_VALUE_CHARS
    assert long_value.endswith("[truncated]")


def test_from_config_reads_every_field():
    cfg = Settings(uri="http://example:5000", experiment="e", run_name="r", register_model_name="m",
                   log_every_steps=25, system_metrics=True, artifact_location="s3://bucket/artifacts")
    tracker = RunTracker.from_config(cfg)
    assert (tracker.uri, tracker.experiment, tracker.run_name, tracker.register_model_name) == (
        "http://example:5000", "e", "r", "m")
    assert tracker.artifact_location == "s3://bucket/artifacts"
    assert tracker.system_metrics is True
    assert [s for s in range(0, 60) if tracker.should_log(s)] == [0, 25, 50]


def test_unreachable_server_warns_once_and_every_call_is_a_no_op(monkeypatch, caplog, tmp_path):
    for name in HTTP_ENV:
        monkeypatch.delenv(name, raising=False)
    uri = closed_port_uri()
    tracker = RunTracker.from_config(Settings(uri=uri, register_model_name="m", system_metrics=True))
    with rayclip_records(caplog) as records:
        started = time.monotonic()
        run_id = tracker.start({"model": {"name": "RN50"}}, "model:\n  name: RN50\n", world_size=2)
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_zero_shot(10, 0.5, 0.9, np.eye(2), ["cat", "dog"])
        model = tmp_path / "clip.pt"
        model.write_bytes(b"not used")
        tracker.finish(str(model))
        elapsed = time.monotonic() - started
    assert run_id is None and not tracker.active
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert uri in warnings[0].getMessage()
    assert elapsed < 15, f"an unreachable server cost {elapsed:.1f}s"


def test_http_uri_sets_short_retry_defaults_without_overriding_the_operator(monkeypatch):
    for name in HTTP_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    RunTracker(uri="http://127.0.0.1:1")
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 3


def test_zero_shot_rejects_a_confusion_matrix_that_does_not_match_the_classes():
    tracker = RunTracker()
    with pytest.raises(ValueError, match="expected \\(3, 3\\)"):
        tracker.log_zero_shot(0, 0.1, 0.2, np.zeros((2, 2)), ["a", "b", "c"])


def test_finish_rejects_unknown_status():
    with pytest.raises(ValueError, match="status must be one of"):
        RunTracker().finish(None, status="DONE")


def test_plots_render_to_png():
    confusion = np.array([[8, 2, 0], [1, 9, 0], [0, 0, 0]])
    for fig in (render_confusion_matrix(confusion, ["a", "b", "c"], step=5),
                render_accuracy_curve([(0, 0.1, 0.3), (100, 0.4, 0.8)])):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = imread(io.BytesIO(buffer.getvalue())).shape
        assert height > 100 and width > 100


def test_short_retry_defaults_make_mlflow_itself_give_up_in_seconds(monkeypatch):
    """Mid-run failures skip the start-time probe, so MLflow's own retry budget is what they cost."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    for name in HTTP_ENV:
        monkeypatch.delenv(name, raising=False)
    uri = closed_port_uri()
    RunTracker(uri=uri)
    started = time.monotonic()
    with pytest.raises(MlflowException, match="127.0.0.1"):
        MlflowClient(uri).get_experiment_by_name("any")
    assert time.monotonic() - started < 15


def test_a_corrupt_local_store_warns_and_training_goes_on(caplog, tmp_path):
    """A sqlite file left broken by a killed run raises SQLAlchemy errors: one warning, then no-ops."""
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"this is not a sqlite database" * 100)
    tracker = RunTracker.from_config(Settings(uri=f"sqlite:///{store}"))
    with rayclip_records(caplog) as records:
        run_id = tracker.start({"optim": {"lr": 1e-3}}, "optim:\n  lr: 0.001\n")
        tracker.log_metrics({"loss": 1.0}, step=0)
    assert run_id is None and not tracker.active
    assert len([r for r in records if r.levelno == logging.WARNING]) == 1
