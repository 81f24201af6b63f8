"""Where a run lives: the layout under checkpoint.storage_path, read against a snapshot Ray Train 2.60 wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from orchestrator import runs

RECORDED = Path(__file__).resolve().parents[1] / "data" / "ray_2.60_checkpoint_manager_snapshot.json"


def test_checkpoints_older_than_manifests_count_where_a_recorded_ray_train_snapshot_lists_them(tmp_path):
    run = runs.run_location(str(tmp_path), None, "rayclip-local-20261201-195309")
    assert not runs.run_exists(run) and runs.latest_checkpoint(run) is None
    Path(run.path).mkdir(parents=True)
    shutil.copy(RECORDED, Path(run.path) / runs.RUN_SNAPSHOT)
    recorded = json.loads(RECORDED.read_text())
    for result in recorded["checkpoint_results"]:
        folder = Path(run.path) / result["checkpoint_dir_name"]
        folder.mkdir()
        (folder / runs.STATE_FILE).write_text("{}")
    unlisted = Path(run.path) / runs.checkpoint_dir_name(700)  # a save cut short: no manifest, not in the snapshot
    unlisted.mkdir()
    (unlisted / runs.STATE_FILE).write_text("{}")
    assert runs.run_exists(run)
    latest = runs.latest_checkpoint(run)
    assert latest.path == f"{run.path}/checkpoint_step_00000600" == f"{run.path}/{recorded['latest_checkpoint_result']['checkpoint_dir_name']}"
    assert recorded["latest_checkpoint_result"]["checkpoint_dir_name"] == runs.checkpoint_dir_name(600)
    chosen, passed_over = runs.resume_checkpoint(run)
    assert not chosen.verified and [(c.step, c.incomplete) for c in passed_over] == [(700, True)]


def test_s3_storage_writes_through_boto3_and_local_paths_stay_local(tmp_path):
    s3 = runs.storage_root("s3://bucket/prefix/", "http://127.0.0.1:9")
    assert (s3.path, s3.url, s3.is_s3) == ("bucket/prefix", "s3://bucket/prefix", True)
    assert s3.fs.type_name == "py::s3+boto3-writes"
    local = runs.run_location(str(tmp_path), None, "r")
    assert local.path == str(tmp_path / "r") and not local.is_s3
