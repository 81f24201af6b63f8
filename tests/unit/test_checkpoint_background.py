"""A checkpoint uploaded in the background counts only once complete: a process killed in the middle of the upload
leaves the checkpoint before it as the one a run resumes from, and the partial folder is removed on resume.

The upload goes to a real S3 HTTP endpoint (moto's server on 127.0.0.1). DeepSpeed's part of the save is stood in
for by an engine that writes many small files (what is tested is the upload and the manifest, not DeepSpeed), so
that the upload lasts long enough to be cut in the middle.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from harness.local_servers import moto_server
from orchestrator import runs
from orchestrator.config import RunConfig
from orchestrator.train import checkpoint as checkpoints

REPO_ROOT = Path(__file__).resolve().parents[2]
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}
FILES = 400  # DeepSpeed files of the stand-in engine, 16 KiB each

SAVER = f"""
import os, sys, time
from orchestrator import runs
from orchestrator.train.checkpoint import TrainState
from orchestrator.train.checkpoint_upload import start_checkpoint

class Engine:
    def save_checkpoint(self, directory, tag):
        os.makedirs(os.path.join(directory, tag))
        for i in range({FILES}):
            with open(os.path.join(directory, tag, f"part_{{i:04d}}.pt"), "wb") as handle:
                handle.write(os.urandom(16384))

run = runs.run_location("s3://ckpt/runs", sys.argv[1], "r")
earlier = start_checkpoint(Engine(), TrainState(step=2), 0, {{}}, run)
earlier.thread.join()
assert earlier.outcome[1] is None, earlier.outcome
runs.write_manifest(earlier.target, 2, 1, earlier.outcome[0])  # what completing it writes (its Ray report aside)
start_checkpoint(Engine(), TrainState(step=4), 0, {{}}, run)
print("uploading", flush=True)
time.sleep(600)
"""


@pytest.fixture
def s3(tmp_path, monkeypatch):
    for name, value in AWS.items():
        monkeypatch.setenv(name, value)
    with moto_server(tmp_path / "moto.log") as url:
        client = boto3.client("s3", endpoint_url=url)
        client.create_bucket(Bucket="ckpt")
        yield url, client


def _keys(client, prefix: str) -> list[str]:
    """The files under ``prefix`` (not the folder markers)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="ckpt", Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", []) if not item["Key"].endswith("/")]


def test_a_process_killed_during_a_background_upload_leaves_the_checkpoint_before_it(s3, tmp_path):
    url, client = s3
    saver = subprocess.Popen([sys.executable, "-c", SAVER, url], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                             start_new_session=True)
    partial = "runs/r/" + runs.checkpoint_dir_name(4, 1) + "/"
    try:
        assert saver.stdout.readline().strip() == "uploading", saver.stdout.read()
        deadline = time.monotonic() + 60
        while not _keys(client, partial) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(saver.pid, signal.SIGKILL)  # the training process dies while its upload runs
        saver.wait(timeout=30)
    finally:
        if saver.poll() is None:
            os.killpg(saver.pid, signal.SIGKILL)
    uploaded = _keys(client, partial)
    assert 0 < len(uploaded) < FILES, len(uploaded)  # cut in the middle
    assert not any(key.endswith(runs.MANIFEST_FILE) for key in uploaded)

    run = runs.run_location("s3://ckpt/runs", url, "r")
    chosen, passed_over = runs.resume_checkpoint(run)
    assert chosen is not None and chosen.step == 2 and chosen.problem is None
    assert [(c.step, c.incomplete) for c in passed_over] == [(4, True)]

    cfg = RunConfig.from_dict({"name": "r", "schedule": {"warmup_steps": 1},
                               "checkpoint": {"storage_path": "s3://ckpt/runs", "s3_endpoint_url": url}})
    resumed = checkpoints.resume_point(cfg, settle=True)
    assert resumed.step == 2
    assert _keys(client, partial) == []  # the save that never finished is gone
    assert len(_keys(client, "runs/r/" + chosen.name + "/")) == FILES + 3  # state, RNG, manifest
