"""A run's identity before Ray starts (the part of ``jobs/pretrain.py`` that names and reserves a run, checks what
``--resume`` continues from, and opens the MLflow run): runs started in the same second stay apart, a new run
never writes into another's folder, and ``--resume`` / ``--from-step`` refuse what cannot be resumed, naming it.
Real folders, a real MLflow store, a real S3 endpoint (moto's server); no Ray is started."""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator import runs, storage
from orchestrator.config import ConfigError, load_config, resolve_local_paths
from orchestrator.train import prepare_run
from tests.unit.test_run_integrity import write_checkpoint

pytestmark = pytest.mark.integration


def config(shards: str, tmp_path: Path, *extra: str):
    overrides = [f"data.shards={shards}", f"checkpoint.storage_path={tmp_path / 'runs'}",
                 f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *extra]
    return resolve_local_paths(load_config(None, overrides), tmp_path)


def _prepare_at(shards: str, folder: str, start: float, queue) -> None:
    cfg = config(shards, Path(folder))
    while time.time() < start:
        time.sleep(0.001)
    prepared = prepare_run(cfg)
    queue.put((prepared.name, prepared.tracking.run_id))


def test_two_jobs_started_in_the_same_second_get_a_run_each(fashion_mnist_shards, tmp_path):
    context = multiprocessing.get_context("spawn")
    queue, start = context.Queue(), math.floor(time.time()) + 8.5  # mid-second: both name their run in that second
    jobs = [context.Process(target=_prepare_at, args=(fashion_mnist_shards, str(tmp_path), start, queue)) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    prepared = [queue.get(timeout=5) for _ in jobs]
    (first, first_run), (second, second_run) = prepared
    assert first != second and first[:-5] == second[:-5]  # the same second, told apart by the random suffix
    for name, run_id in prepared:
        record = json.loads((tmp_path / "runs" / name / runs.RUN_RECORD).read_text())
        assert record["name"] == name and record["mlflow_run_id"] == run_id
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert {client.get_run(run_id).info.run_name for _, run_id in prepared} == {first, second}


def test_a_new_run_never_writes_into_an_existing_run_folder(fashion_mnist_shards, tmp_path, monkeypatch):
    taken = tmp_path / "runs" / "rayclip-local-20261207-120000-beef"
    write_checkpoint(runs.storage.resolve(str(taken)), 4)
    monkeypatch.setattr(runs, "unique_run_name", lambda base: taken.name)
    with pytest.raises(ConfigError) as error:
        prepare_run(config(fashion_mnist_shards, tmp_path))
    assert str(error.value) == (f"a run folder {taken} exists already: a new run never writes into another run's "
                                f"folder; continue that run with --resume {taken.name}")
    assert sorted(p.name for p in taken.iterdir()) == ["checkpoint_step_00000004"]  # untouched


def test_resume_refuses_what_cannot_be_resumed_and_names_it(fashion_mnist_shards, tmp_path):
    cfg = config(fashion_mnist_shards, tmp_path)
    name = "rayclip-local-20261207-120000-cafe"
    run = runs.run_location(cfg.checkpoint.storage_path, None, name)
    with pytest.raises(ConfigError, match=f"--resume '{name}': no run at {run.url}"):
        prepare_run(cfg, resume=name)
    write_checkpoint(run, 4)
    write_checkpoint(run, 8)
    with pytest.raises(ConfigError, match="--from-step needs --resume"):
        prepare_run(cfg, from_step=4)
    with pytest.raises(ConfigError, match=r"--from-step 6: no checkpoint of that step; intact checkpoints of \S+: steps 4, 8"):
        prepare_run(cfg, resume=name, from_step=6)
    for step in (4, 8):  # every checkpoint damaged: nothing to resume from, and a fresh start would lose the run
        (Path(run.path) / runs.checkpoint_dir_name(step) / runs.STATE_FILE).write_text("{}")
    with pytest.raises(ConfigError, match=r"--resume \S+: no intact checkpoint of \S+ to resume from \("
                                          r"checkpoint_step_00000004: train_state\.json is 2 bytes"):
        prepare_run(cfg, resume=name)


def test_from_step_pins_the_older_checkpoint_for_the_whole_run(fashion_mnist_shards, tmp_path):
    cfg = config(fashion_mnist_shards, tmp_path)
    name = "rayclip-local-20261207-120000-f00d"
    run = runs.run_location(cfg.checkpoint.storage_path, None, name)
    write_checkpoint(run, 4)
    write_checkpoint(run, 8)
    resumed = prepare_run(cfg, resume=name, from_step=4)
    assert resumed.name == name and runs.read_record(run)["pinned"]["step"] == 4
    assert runs.resume_checkpoint(run)[0].step == 4  # what the controller and every worker will load


def _reserve_s3(url: str, endpoint: str, start: float, queue) -> None:
    while time.time() < start:
        time.sleep(0.001)
    try:
        runs.reserve(runs.run_location(url, endpoint, "same"), {"name": "same"})
        queue.put("won")
    except runs.RunFolderTaken:
        queue.put("taken")


def test_on_s3_of_several_jobs_reserving_one_run_exactly_one_wins(s3_endpoint):
    storage.s3_client(s3_endpoint).create_bucket(Bucket="reserve")
    context = multiprocessing.get_context("spawn")
    queue, start = context.Queue(), time.time() + 6.0
    jobs = [context.Process(target=_reserve_s3, args=("s3://reserve/runs", s3_endpoint, start, queue)) for _ in range(4)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=60)
    assert sorted(queue.get(timeout=5) for _ in jobs) == ["taken"] * 3 + ["won"]
    with pytest.raises(runs.RunFolderTaken):
        runs.reserve(runs.run_location("s3://reserve/runs", s3_endpoint, "same"), {"name": "later"})
