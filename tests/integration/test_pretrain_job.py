"""``jobs/pretrain.py`` as the product runs it: ``ray job submit --working-dir .`` against ``ray start --head``.

A real head node on 127.0.0.1 (token auth, as Ray 2.60 enables it), the repository shipped as the job's
working directory, the job's driver joining the cluster through RAY_ADDRESS, and the job's own output
ending with where the model and MLflow run are and the zero-shot accuracy. A bad config must fail before
any Ray time, naming the field.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from harness.local_servers import free_port, stop_ray_head, submit_job, wait_until_serving
from orchestrator.train import DEFAULT_EXTENSIONS_DIR

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_bad_config_fails_before_ray_naming_the_field():
    run = subprocess.run(
        [sys.executable, "jobs/pretrain.py", "--set", "deepspeed.zero_stage=5"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2
    assert "deepspeed.zero_stage = 5" in run.stderr and "0, 1, 2 or 3" in run.stderr
    assert "ray" not in run.stdout.lower()


def test_missing_shards_fail_in_one_line_before_ray(tmp_path):
    run = subprocess.run(
        [sys.executable, "jobs/pretrain.py", "--set", f"data.shards={tmp_path / 'nonexistent'}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: data.shards={str(tmp_path / 'nonexistent')!r}: folder {tmp_path / 'nonexistent'} does not exist"]
    assert "Traceback" not in run.stderr and "ray" not in run.stdout.lower()


def test_ray_job_submit_runs_pretraining(fashion_mnist_shards, tmp_path):
    dashboard_port, gcs_port = free_port(), free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(DEFAULT_EXTENSIONS_DIR))
    try:
        # token auth answers 401 to a request without a token: that already means the server is up
        wait_until_serving(address + "/api/version", head, name="ray start", timeout_s=120, http_error_means_up=True)
        overrides = [
            f"data.shards={fashion_mnist_shards}", "data.decode_concurrency=1", "data.shuffle_buffer=256",
            "deepspeed.micro_batch_size=64", "schedule.warmup_steps=2", "schedule.total_steps=6",
            "checkpoint.every_steps=3", f"checkpoint.storage_path={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "eval.max_images=500",
        ]
        pretrain = ["python", "jobs/pretrain.py", *[arg for o in overrides for arg in ("--set", o)]]
        runtime_env = {"env_vars": {"TORCH_EXTENSIONS_DIR": extensions}}
        run = submit_job(address, pretrain, env, REPO_ROOT, runtime_env=runtime_env, timeout_s=600)
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-4000:]
        assert "succeeded" in output
        assert "relative checkpoint and MLflow paths resolve under" in output  # the job's cwd is Ray's copy
        assert "(6/6 steps)" in output and "openai_model.pt" in output and "MLflow UI:" in output
        top1 = [line for line in output.splitlines() if line.startswith("zero-shot top-1: ")]
        run_id = next(line.split(", run ")[1].split(" at ")[0] for line in output.splitlines() if line.startswith("MLflow: "))
        logged = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data.metrics["zero_shot_top1"]
        assert top1 and top1[-1] == f"zero-shot top-1: {logged:.3f}"  # what the job prints is what MLflow holds

        # the design card's command as typed: the default data.shards is relative, and Ray's copy of the
        # working directory holds no data, so the job stops in one line saying what to pass
        default = submit_job(address, pretrain[:2], env, REPO_ROOT, runtime_env=runtime_env, timeout_s=600)
        output = default.stdout + default.stderr
        assert default.returncode != 0
        assert "error: data.shards='" in output and "--set data.shards=/abs/path" in output, output[-3000:]
        assert "Traceback" not in output
    finally:
        stop_ray_head(head, gcs_port)
