"""A job's driver killed by SIGKILL leaves nothing of the local Ray that ``start_ray`` started for it (the raylet's
agents alone would stay a minute, Ray 2.60); a normal exit leaves nothing either; and a driver that joined a
cluster through RAY_ADDRESS starts no guard, so killing it leaves that cluster as it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
GONE_WITHIN_S = 15

DRIVER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path

    import psutil, ray
    from orchestrator.ray_start import start_ray

    start_ray(2, what="a test", shortfall_hint="a bigger cluster")

    @ray.remote
    class Echo:
        def pid(self):
            return os.getpid()

    @ray.remote
    def pid():
        return os.getpid()

    echo = Echo.remote()
    workers = ray.get([echo.pid.remote(), pid.remote()])
    family = [[p.pid, p.create_time(), " ".join(p.cmdline()).strip()]
              for p in psutil.Process().children(recursive=True)]
    report = Path(sys.argv[2])
    report.with_suffix(".part").write_text(json.dumps({"gcs": ray.get_runtime_context().gcs_address,
                                                       "workers": workers, "family": family}))
    report.with_suffix(".part").rename(report)
    if sys.argv[1] == "exit":
        ray.shutdown()
    else:
        time.sleep(600)
""")


class Driver:
    """The driver script, run as a job is (a session of its own), and the descendants it reported."""

    def __init__(self, mode: str, work: Path, ray_address: str | None = None):
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        if ray_address:
            # a local Ray turns token auth on by default; a driver joining it must too (ray job submit's does)
            env.update(RAY_ADDRESS=ray_address, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "token"))
        work.mkdir(parents=True)
        self.output, self.report_path = work / "output.log", work / "report.json"
        with self.output.open("w") as output:
            self.process = subprocess.Popen([sys.executable, "-c", DRIVER, mode, str(self.report_path)], cwd=REPO_ROOT,
                                            env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        self.report: dict = {"family": []}

    def wait_for_report(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.report_path.exists():
            # a driver that exits normally has written its report before
            assert self.process.poll() is None or self.report_path.exists(), \
                f"the driver exited early:\n{self.output.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no report in {timeout_s} s:\n{self.output.read_text()[-3000:]}"
            time.sleep(0.2)
        self.report = json.loads(self.report_path.read_text())

    def reported(self) -> list[tuple[psutil.Process, str]]:
        """The descendants it reported, with their command lines, that are still the same processes."""
        found = []
        for pid, create_time, cmdline in self.report["family"]:
            try:
                process = psutil.Process(pid)
                if process.create_time() == create_time:
                    found.append((process, cmdline))
            except psutil.NoSuchProcess:
                pass
        return found

    def running(self) -> dict[int, str]:
        """The reported descendants still running: PID -> command line."""
        return {process.pid: cmdline for process, cmdline in self.reported() if _alive(process)}

    def running_after(self, timeout_s: float) -> dict[int, str]:
        deadline = time.monotonic() + timeout_s
        while (running := self.running()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return running

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def clean_up(self) -> None:
        """Kill the driver and what it started, by PID: its descendants now and those it reported."""
        started = psutil.Process(self.process.pid).children(recursive=True) if self.process.poll() is None else []
        self.kill()
        for process in started + [process for process, _ in self.reported()]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def drivers():
    """Starts a driver and waits for its report; every driver is cleaned up afterwards, however the test ended."""
    started: list[Driver] = []

    def start(mode: str, work: Path, ray_address: str | None = None) -> Driver:
        started.append(Driver(mode, work, ray_address))
        started[-1].wait_for_report()
        return started[-1]

    yield start
    for driver in reversed(started):
        driver.clean_up()


def test_a_killed_driver_leaves_nothing_of_its_local_ray_behind(drivers, tmp_path):
    driver = drivers("sleep", tmp_path / "local")
    assert set(driver.report["workers"]) <= driver.running().keys(), "the actor and the task run in workers"
    driver.kill()
    assert driver.running_after(GONE_WITHIN_S) == {}


def test_a_normal_exit_leaves_nothing_behind_and_nothing_of_the_guard_is_printed(drivers, tmp_path):
    driver = drivers("exit", tmp_path / "local")
    assert driver.process.wait(timeout=60) == 0
    assert driver.running_after(GONE_WITHIN_S) == {}
    output = driver.output.read_text()
    assert "process_guard" not in output and "Traceback" not in output, output[-3000:]


def test_a_driver_joining_a_cluster_starts_no_guard_and_its_death_leaves_the_cluster_alone(drivers, tmp_path):
    cluster = drivers("sleep", tmp_path / "local")
    joined = drivers("sleep", tmp_path / "joined", ray_address=cluster.report["gcs"])
    guards = [[cmdline for _, _, cmdline in d.report["family"] if "orchestrator.process_guard" in cmdline]
              for d in (cluster, joined)]
    assert [len(found) for found in guards] == [1, 0], guards
    joined.kill()
    time.sleep(3)  # longer than a guard takes to act
    # the raylet may retire an idle worker at any time; everything else of the cluster must still run
    kept = {pid for pid, _, cmdline in cluster.report["family"] if not cmdline.startswith("ray::IDLE")}
    assert kept - cluster.running().keys() == set()
