"""MLflow tracking against a real local sqlite store (no server): runs, failures, experiments' artifact locations."""

import logging

from mlflow import MlflowClient

from orchestrator.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, RunTracker, is_temporary
from tests.factories import TrackingSettings as Settings
from tests.factories import artifact_paths, assert_registered, rayclip_records, write_export_file


def test_default_sqlite_store_in_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    tracker = RunTracker.from_config(Settings(uri="sqlite:///mlflow.db", experiment="local",
                                              register_model_name="rayclip-local"))
    run_id = tracker.start({"model": {"name": "ViT-B/32"}}, "model: {name: ViT-B/32}\n")
    tracker.log_metrics({"loss": 1.5, "samples_per_s": 2.5}, step=0)
    write_export_file(tmp_path / "clip_rn50.pt")
    tracker.finish(str(tmp_path / "clip_rn50.pt"))

    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient("sqlite:///mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"loss": 1.5, "samples_per_s": 2.5}
    assert run.data.tags["model"] == "ViT-B/32"
    assert "model/clip_rn50.pt" in artifact_paths(client, run_id)
    assert_registered(client, "rayclip-local", run_id)


def test_store_failure_mid_run_warns_once_and_training_goes_on(monkeypatch, tmp_path, caplog):
    monkeypatch.chdir(tmp_path)
    tracker = RunTracker(uri="sqlite:///mlflow.db", experiment="broken")
    run_id = tracker.start({"model": {"name": "RN50"}}, "model: {name: RN50}\n")
    tracker.log_metrics({"loss": 1.0}, step=0)
    MlflowClient("sqlite:///mlflow.db").delete_run(run_id)  # the store now rejects writes to this run
    with rayclip_records(caplog) as records:
        for step in range(1, 4):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        tracker.finish(None)
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sqlite:///mlflow.db" in warnings[0].getMessage()
    assert not tracker.active and tracker.disabled
    *metrics, status = [entry.split(":")[0] for entry in tracker.report.rejected]
    assert metrics and set(metrics) == {"metrics"} and status == "the run's status (FINISHED)"


def test_resume_of_an_unknown_run_starts_a_new_one(monkeypatch, tmp_path, caplog):
    monkeypatch.chdir(tmp_path)
    tracker = RunTracker(uri="sqlite:///mlflow.db", experiment="fresh")
    with rayclip_records(caplog) as records:
        run_id = tracker.start({"model": {"name": "RN50"}}, "x: 1\n", resume_run_id="0" * 32)
    assert run_id is not None and run_id != "0" * 32
    assert any("not found" in r.getMessage() for r in records)
    tracker.finish(None)
    assert MlflowClient("sqlite:///mlflow.db").get_run(run_id).info.status == "FINISHED"


def test_a_new_experiment_keeps_its_artifacts_beside_the_store_and_is_a_training_experiment(monkeypatch, tmp_path):
    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a Ray worker's working directory is Ray's session folder
    tracker = RunTracker.from_config(Settings(uri=f"sqlite:///{store / 'mlflow.db'}", experiment="beside"))
    run_id = tracker.start({"model": {"name": "RN50"}}, "model: {name: RN50}\n")
    write_export_file(tmp_path / "clip_rn50.pt")
    tracker.finish(str(tmp_path / "clip_rn50.pt"))

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("beside")
    assert experiment.artifact_location == (store / "mlartifacts").as_uri()
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    stored = store / "mlartifacts" / run_id / "artifacts"
    assert (stored / "model" / "clip_rn50.pt").is_file() and (stored / "config.yaml").is_file()
    assert not any(elsewhere.iterdir())


def test_a_configured_artifact_location_wins(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker.from_config(Settings(uri=uri, experiment="chosen", artifact_location=str(tmp_path / "art")))
    run_id = tracker.start({"x": 1}, "x: 1\n")
    tracker.finish(None)
    assert MlflowClient(uri).get_experiment_by_name("chosen").artifact_location == str(tmp_path / "art")
    assert (tmp_path / "art" / run_id / "artifacts" / "config.yaml").is_file()


def test_an_experiment_inside_a_ray_session_folder_is_reported(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    session = tmp_path / "ray" / "session_2026-12-01_10-00-00_000000_1" / "artifacts"
    MlflowClient(uri).create_experiment("old", artifact_location=session.as_uri())
    with rayclip_records(caplog) as records:
        run_id = RunTracker.from_config(Settings(uri=uri, experiment="old")).start({"x": 1}, "x: 1\n")
    assert run_id is not None
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "session_2026-12-01" in warnings[0] and "tracking.experiment" in warnings[0]
    assert is_temporary(session.as_uri()) and not is_temporary((tmp_path / "mlartifacts").as_uri())
    assert not is_temporary("s3://bucket/ray/session_1")
