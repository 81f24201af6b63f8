"""Unit tests for orchestrator/tracking/ that need no MLflow server (one uses a local sqlite store)."""

import io
import logging
import os
import socket
import time

import numpy as np
import pytest
from matplotlib.image import imread
from mlflow import MlflowClient

from orchestrator.eval import EvalResult
from orchestrator.tracking import (
    CONFUSION_MAX_CLASSES,
    MAX_PARAM_VALUE_CHARS,
    MAX_PARAMS_PER_BATCH,
    RunTracker,
    evaluation_figures,
    evaluation_metrics,
    flatten_config,
    param_batches,
    render_confusion_matrix,
    render_metric_curve,
    render_per_class,
    render_recall_at_k,
)
from tests.factories import TrackingSettings as Settings
from tests.factories import artifact_paths, metric_history, rayclip_records

HTTP_ENV = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)


def zero_shot_result(top1: float = 0.5, confusion=((1, 1), (0, 2)), names=("cat", "dog")) -> EvalResult:
    return EvalResult("pets", "zeroshot", {"zeroshot_top1": top1, "zeroshot_top5": 1.0}, 4,
                      class_names=list(names), confusion=np.asarray(confusion), per_class={"cat": 0.5, "dog": 1.0})


def retrieval_result() -> EvalResult:
    metrics = {f"{d}_recall_at_{k}": value for d, base in (("image_to_text", 0.4), ("text_to_image", 0.3))
               for k, value in zip((1, 5, 10), (base, base + 0.3, base + 0.4))}
    return EvalResult("coco", "retrieval", metrics, 10)


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


def test_unreachable_server_costs_training_no_time_and_the_end_says_what_it_did_not_get(monkeypatch, caplog, tmp_path):
    """Calls return at once while nothing answers; `start` waits its few seconds, `finish` its flush timeout, then
    one warning and a report of every value and file that waits."""
    for name in HTTP_ENV:
        monkeypatch.delenv(name, raising=False)
    uri = closed_port_uri()
    tracker = RunTracker.from_config(Settings(uri=uri, register_model_name="m", system_metrics=True),
                                     start_wait_s=2.0, flush_timeout_s=2.0)
    with rayclip_records(caplog) as records:
        run_id = tracker.start({"model": {"name": "RN50"}}, "model:\n  name: RN50\n", world_size=2)
        started = time.monotonic()
        for step in range(50):
            tracker.log_metrics({"loss": 1.0, "lr": 0.1}, step=step)
        tracker.log_evaluation(zero_shot_result(), 10, {"zero_shot_top1": 0.5})
        logging_s = time.monotonic() - started
        model = tmp_path / "clip.pt"
        model.write_bytes(b"not used")
        report = tracker.finish(str(model))
    assert run_id is None and not tracker.active and tracker.disabled
    assert logging_s < 1.0, f"logging against an unreachable server took {logging_s:.1f} s"
    assert report.sent_values == 0 and report.pending_values == 50 * 2 + 3
    assert "the exported model" in report.pending and "the plots of pets at step 10" in report.pending
    assert len(tracker.unsent_metrics) == 103 and {m["key"] for m in tracker.unsent_metrics} >= {"loss", "lr"}
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and uri in warnings[0].getMessage() and "connection refused" in warnings[0].getMessage()


def test_http_uri_sets_short_retry_defaults_without_overriding_the_operator(monkeypatch):
    for name in HTTP_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    RunTracker(uri="http://127.0.0.1:1")
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 3


def test_a_confusion_matrix_that_does_not_match_the_classes_is_rejected_tracking_or_not():
    bad = zero_shot_result(confusion=np.zeros((2, 2)), names=("a", "b", "c"))
    with pytest.raises(ValueError, match="expected \\(3, 3\\) for 3 class names"):
        evaluation_figures(bad, 0, [])
    with pytest.raises(ValueError, match="expected \\(3, 3\\)"):
        RunTracker().log_evaluation(bad, 0)


def test_evaluation_metrics_are_named_per_set():
    assert evaluation_metrics(zero_shot_result()) == {"eval/pets/zeroshot_top1": 0.5, "eval/pets/zeroshot_top5": 1.0}
    assert evaluation_metrics(retrieval_result())["eval/coco/text_to_image_recall_at_5"] == pytest.approx(0.6)


def test_evaluation_figures_per_task():
    figures = evaluation_figures(zero_shot_result(), 7, [(0, 0.2), (7, 0.5)])
    assert set(figures) == {"per_class_step_00000007.png", "confusion_step_00000007.png", "curve.png"}
    no_history = evaluation_figures(zero_shot_result(), 7, [])
    assert set(no_history) == {"per_class_step_00000007.png", "confusion_step_00000007.png"}
    assert set(evaluation_figures(retrieval_result(), 3, [(3, 0.4)])) == {"recall_at_k_step_00000003.png", "curve.png"}
    probe = EvalResult("pets", "linear-probe", {"linear_probe_top1": 0.9, "linear_probe_C": 3.16}, 4,
                       class_names=["cat", "dog"], per_class={"cat": 0.8, "dog": 1.0})
    assert set(evaluation_figures(probe, 1, [(1, 0.9)])) == {"per_class_step_00000001.png", "curve.png"}
    names = [f"class {i}" for i in range(CONFUSION_MAX_CLASSES + 1)]
    many = zero_shot_result(confusion=np.eye(len(names)), names=names)  # unreadable drawn; the results file keeps it
    assert "confusion_step_00000001.png" not in evaluation_figures(many, 1, [])


def test_finish_rejects_unknown_status():
    with pytest.raises(ValueError, match="status must be one of"):
        RunTracker().finish(None, status="DONE")


def test_plots_render_to_png():
    confusion = np.array([[8, 2, 0], [1, 9, 0], [0, 0, 0]])
    for fig in (render_confusion_matrix(confusion, ["a", "b", "c"], step=5, title="pets zero-shot"),
                render_metric_curve([(100, 0.4), (0, 0.1)], "zeroshot_top1", "pets zero-shot"),
                render_per_class({"a": 0.8, "b": 0.9, "c": 0.0}, "per-class recall", "pets zero-shot"),
                render_recall_at_k({"image->text": {1: 0.4, 5: 0.7, 10: 0.8}, "text->image": {1: 0.3, 5: 0.6, 10: 0.7}},
                                   "coco retrieval")):
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


def test_a_corrupt_local_store_is_refused_once_and_training_goes_on(caplog, tmp_path):
    """A sqlite file that is no database refuses every write alike: one warning, nothing retried for ever."""
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"this is not a sqlite database" * 100)
    tracker = RunTracker.from_config(Settings(uri=f"sqlite:///{store}"), flush_timeout_s=5.0)
    with rayclip_records(caplog) as records:
        started = time.monotonic()
        run_id = tracker.start({"optim": {"lr": 1e-3}}, "optim:\n  lr: 0.001\n")
        tracker.log_metrics({"loss": 1.0}, step=0)
        report = tracker.finish(None)
    assert run_id is None and tracker.disabled and time.monotonic() - started < 5.0
    assert len(report.rejected) == 3 and report.pending_values == 0
    assert len([r for r in records if r.levelno == logging.WARNING]) == 1


def test_log_evaluation_writes_metrics_and_figures_and_redraws_the_curve_after_a_restart(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    uri = "sqlite:///mlflow.db"
    first = RunTracker(uri=uri, experiment="eval")
    run_id = first.start({"model": {"name": "ViT-tiny"}}, "model: {name: ViT-tiny}\n")
    first.log_evaluation(zero_shot_result(top1=0.25), 10, {"zero_shot_top1": 0.25})
    first.log_evaluation(retrieval_result(), 10)
    first.finish(None, status="FAILED")

    second = RunTracker(uri=uri, experiment="eval")
    assert second.attach(run_id)
    second.log_evaluation(zero_shot_result(top1=0.5), 20)
    assert second.evaluation_history["pets"] == [(10, 0.25), (20, 0.5)]  # the curve keeps the steps before the restart
    assert not RunTracker(uri=uri, experiment="eval").attach("0" * 32)
    second.finish(None, status=None)  # waits for what its outbox holds (metrics, then figures drawn there)

    assert metric_history(uri, run_id, "eval/pets/zeroshot_top1") == {10: 0.25, 20: 0.5}
    assert metric_history(uri, run_id, "zero_shot_top1") == {10: 0.25}
    assert metric_history(uri, run_id, "eval/coco/image_to_text_recall_at_10") == {10: pytest.approx(0.8)}
    assert artifact_paths(MlflowClient(uri), run_id) >= {
        "eval/pets/per_class_step_00000010.png", "eval/pets/confusion_step_00000010.png",
        "eval/pets/per_class_step_00000020.png", "eval/pets/confusion_step_00000020.png", "eval/pets/curve.png",
        "eval/coco/recall_at_k_step_00000010.png", "eval/coco/curve.png"}
