"""Where a run lives: the layout under checkpoint.storage_path, read against a snapshot Ray Train 2.60 wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from orchestrator import runs

RECORDED = Path(__file__).resolve().parents[1] / "data" / "ray_2.60_checkpoint_manager_snapshot.json"


def test_latest_checkpoint_is_read_from_a_recorded_ray_train_snapshot(tmp_path):
    run = runs.run_location(str(tmp_path), None, "rayclip-local-20261201-195309")
    assert not runs.run_exists(run) and runs.latest_checkpoint(run) is None
    Path(run.path).mkdir(parents=True)
    shutil.copy(RECORDED, Path(run.path) / runs.RUN_SNAPSHOT)
    assert runs.run_exists(run)
    latest = runs.latest_checkpoint(run)
    recorded = json.loads(RECORDED.read_text())["latest_checkpoint_result"]
    assert latest.path == f"{run.path}/checkpoint_step_00000600" == f"{run.path}/{recorded['checkpoint_dir_name']}"
    assert recorded["checkpoint_dir_name"] == runs.checkpoint_dir_name(600)


def test_s3_storage_writes_through_boto3_and_local_paths_stay_local(tmp_path):
    s3 = runs.storage_root("s3://bucket/prefix/", "http://127.0.0.1:9")
    assert (s3.path, s3.url, s3.is_s3) == ("bucket/prefix", "s3://bucket/prefix", True)
    assert s3.fs.type_name == "py::s3+boto3-writes"
    local = runs.run_location(str(tmp_path), None, "r")
    assert local.path == str(tmp_path / "r") and not local.is_s3
