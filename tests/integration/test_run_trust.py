"""Nothing lost: ``jobs/pretrain.py`` as a user runs it, meeting the faults a long run meets.

Each test runs the real job (its own local Ray, 2 DeepSpeed workers, a real MLflow store or server) on a tiny
ViT and does to it what happens to real runs: Ctrl-C in the middle, a checkpoint file cut in half, a disk that
fills up, an MLflow server that goes away and comes back, shards that are damaged. What the job prints, its exit
code, what is in storage and what is in MLflow are checked.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from harness.local_servers import free_port, stop, wait_until_serving
from orchestrator import runs

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def tiny(shards: str, tmp_path: Path, *extra: str, uri: str | None = None, storage: Path | None = None) -> list[str]:
    """``--set`` arguments of a small run: ViT-tiny, 2 workers, a checkpoint every 4 steps."""
    overrides = [
        f"data.shards={shards}", "data.decode_concurrency=1", "data.shuffle_buffer=256", "deepspeed.micro_batch_size=64",
        "schedule.warmup_steps=2", "schedule.total_steps=8", "optim.lr=2e-3", "checkpoint.every_steps=4",
        f"checkpoint.storage_path={storage or tmp_path / 'runs'}", f"tracking.uri={uri or f'sqlite:///{tmp_path}/mlflow.db'}",
        "tracking.log_every_steps=1", "eval.max_images=500", *extra,
    ]
    return [arg for override in overrides for arg in ("--set", override)]


class Job:
    """``python jobs/pretrain.py ...`` in a subprocess, its output in a file that the test can wait on."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        env.pop("RAY_ADDRESS", None)
        with open(log, "w") as handle:
            self.process = subprocess.Popen([sys.executable, "jobs/pretrain.py", *args], cwd=REPO_ROOT, env=env,
                                            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float = 300) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output)
            if found:
                return found
            assert self.process.poll() is None, f"the job ended before {pattern!r}:\n{self.output[-3000:]}"
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout_s} s:\n{self.output[-3000:]}")

    def finish(self, timeout_s: float = 480) -> tuple[int, str]:
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise
        return code, self.output


def run_job(args: list[str], log: Path) -> tuple[int, str]:
    return Job(args, log).finish()


def mlflow_run(client: MlflowClient, name: str):
    [run] = client.search_runs(experiment_ids=[client.get_experiment_by_name("rayclip").experiment_id],
                               filter_string=f"attributes.run_name = '{name}'")
    return run


def logged_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_ctrl_c_saves_a_checkpoint_and_a_damaged_checkpoint_is_passed_over_on_resume(fashion_mnist_shards, tmp_path):
    args = tiny(fashion_mnist_shards, tmp_path, "schedule.total_steps=24")
    job = Job(args, tmp_path / "first.log")
    job.wait_for(r"step 6/24 ")
    job.process.send_signal(signal.SIGINT)
    code, output = job.finish()
    assert code == 130, output[-3000:]
    name = re.search(r"resume with: python jobs/pretrain\.py --resume (\S+)", output).group(1)
    stop_step = int(re.search(r"stopping at step (\d+) as the job asked", output).group(1))
    assert 6 <= stop_step < 24 and re.search(rf"step {stop_step}: checkpoint saved to \S+", output)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    first = mlflow_run(client, name)
    assert first.info.status == "KILLED" and not client.search_model_versions(f"run_id = '{first.info.run_id}'")

    run = Path(tmp_path / "runs" / name)
    newest = max(run.glob("checkpoint_step_*"))
    largest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    cut_in_half(largest)
    fallback = (stop_step - 1) // 4 * 4
    code, output = run_job([*args, "--resume", name], tmp_path / "resumed.log")
    assert code == 0, output[-3000:]
    relative = largest.relative_to(newest).as_posix()
    assert re.search(rf"{newest} is damaged \({relative} is [\d.]+ MB, the manifest says [\d.]+ MB\)", output), output
    assert f"resuming {name} from {runs.checkpoint_dir_name(fallback)} (step {fallback})" in output
    assert f"run: {name} (24/24 steps)" in output and "Traceback" not in output
    resumed = mlflow_run(client, name)  # one run across both jobs, each step logged once
    assert resumed.info.run_id == first.info.run_id and resumed.info.status == "FINISHED"
    assert logged_steps(client, resumed.info.run_id) == list(range(1, 25))
    [version] = client.search_model_versions(f"run_id = '{resumed.info.run_id}'")
    assert f"MLflow model registry: 'rayclip-local' version {version.version}" in output
    assert (newest / runs.DAMAGE_NOTE).exists() or not newest.exists()  # marked, or since removed by num_to_keep


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MB filesystem (tmpfs), too small for the tiny run's first checkpoint (~55 MB)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_run_at_once_and_frees_what_the_failed_save_wrote(fashion_mnist_shards, tmp_path,
                                                                                small_disk):
    code, output = run_job(tiny(fashion_mnist_shards, tmp_path, storage=small_disk / "runs"), tmp_path / "job.log")
    assert code == 1, output[-3000:]
    [line] = [line for line in output.splitlines() if line.startswith("error: ")]
    assert re.fullmatch(r"error: run (\S+) stopped: the step-4 checkpoint was not saved \(rank \d: no space left on "
                        rf"the disk holding {small_disk}/runs/\S+/checkpoint_step_00000004 \(\d+\.\d MB free of "
                        r"4\d\.\d MB\): .*\); its partial folder \S+ was removed", line), line
    assert output.count("DeepSpeed ZeRO-1 engine built") == 1  # stopped, not retried
    assert "Traceback" not in output
    name = re.search(r"error: run (\S+) stopped", line).group(1)
    assert sorted(p.name for p in (small_disk / "runs" / name).iterdir() if not p.name.startswith(".")) == [runs.RUN_RECORD]
    usage = os.statvfs(small_disk)
    assert usage.f_bfree / usage.f_blocks > 0.99  # the space the failed save took is free again
    assert mlflow_run(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"), name).info.status == "FAILED"


class Server:
    """An ``mlflow server`` on a fixed port that the test can stop and start again on the same store."""

    def __init__(self, root: Path):
        self.root, self.port, self.process = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.root / "server.log", "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
        wait_until_serving(f"{self.uri}/health", self.process, name="mlflow server", timeout_s=90)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_an_mlflow_outage_in_the_middle_of_a_run_loses_nothing(fashion_mnist_shards, tmp_path, server):
    job = Job(tiny(fashion_mnist_shards, tmp_path, "schedule.total_steps=24", uri=server.uri), tmp_path / "job.log")
    job.wait_for(r"step 6/24 ")
    server.stop()
    time.sleep(20)
    server.start()
    code, output = job.finish()
    assert code == 0, output[-3000:]
    assert f"MLflow at {server.uri} does not answer (connection refused)" in output
    assert re.search(rf"MLflow at {re.escape(server.uri)} answers again after \d+ s", output)
    assert "MLflow received everything the run logged" in output and "Traceback" not in output
    name = re.search(r"run: (\S+) \(24/24 steps\)", output).group(1)
    client = MlflowClient(server.uri)
    run = mlflow_run(client, name)
    assert run.info.status == "FINISHED" and logged_steps(client, run.info.run_id) == list(range(1, 25))
    assert "eval/heldout/zeroshot_top1" in run.data.metrics
    assert client.search_model_versions(f"run_id = '{run.info.run_id}'")


def test_an_unreachable_tracking_server_is_refused_before_ray_starts(fashion_mnist_shards, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    code, output = run_job(tiny(fashion_mnist_shards, tmp_path, uri=uri), tmp_path / "job.log")
    assert code == 2
    assert [line for line in output.splitlines() if "error" in line.lower()] == [
        f"error: tracking.uri={uri!r}: no MLflow server answers at {uri} ([Errno 111] Connection refused): start it, "
        "point tracking.uri at one that answers, or set tracking.required=false to train and log once it answers"]
    assert "Ray" not in output
    assert not (tmp_path / "runs").exists()  # nothing reserved, nothing written


def garbage_shards(source: str, target: Path, damaged: int) -> Path:
    """A copy of a shard set with its first ``damaged`` tars replaced by random bytes (a failed copy)."""
    target.mkdir()
    for path in sorted(Path(source).iterdir()):
        if path.is_file():
            (target / path.name).write_bytes(path.read_bytes())
    for tar in sorted(target.glob("*.tar"))[:damaged]:
        tar.write_bytes(os.urandom(tar.stat().st_size))
    (target / "heldout").symlink_to(Path(source) / "heldout")
    return target


def test_damaged_data_is_named_and_a_run_it_cuts_short_is_not_registered(fashion_mnist_shards, tmp_path):
    shards = garbage_shards(fashion_mnist_shards, tmp_path / "shards", damaged=5)
    code, output = run_job(tiny(str(shards), tmp_path, "data.max_error_fraction=0.9"), tmp_path / "short.log")
    assert code == 1, output[-3000:]
    # 5 of 6 shards are noise, read once in each of the 2 epochs the stream plans: the last line counts 10 reads
    assert re.findall(r"data: [\d,]+ samples in unreadable shards \(\d+ reads\)", output)[-1] == \
        "data: 5,000 samples in unreadable shards (10 reads)", output[-3000:]
    assert re.search(r"error: the run ended at step 7 of 8: the data stream ran out .* its model was not registered; "
                     r"resume with: python jobs/pretrain\.py --resume \S+", output)
    name = re.search(r"run: (\S+) \(7/8 steps\)", output).group(1)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = mlflow_run(client, name)
    assert run.info.status == "KILLED" and not client.search_model_versions(f"run_id = '{run.info.run_id}'")
