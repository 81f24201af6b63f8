"""Starting and stopping the real servers tests talk to (moto S3, mlflow server, a Ray head) on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(
    url: str,
    process: subprocess.Popen,
    *,
    name: str,
    timeout_s: float,
    log_path: Path | None = None,
    http_error_means_up: bool = False,
) -> None:
    """Poll ``url`` until it answers 2xx (or any HTTP status, if ``http_error_means_up``); fail on early exit."""

    def log_tail() -> str:
        return f":\n{log_path.read_text()[-3000:]}" if log_path and log_path.exists() else ""

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited early with code {process.returncode}{log_tail()}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            if http_error_means_up:  # e.g. token auth answering 401: the server is up
                return
            time.sleep(0.3)
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{name} at {url} did not answer within {timeout_s} s{log_tail()}")


@contextlib.contextmanager
def moto_server(log_path: str | Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """The endpoint URL of a moto S3 server on 127.0.0.1 (its output in ``log_path``), stopped by its PID on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_until_serving(url + "/moto-api/", server, name="moto server", timeout_s=30, log_path=Path(log_path))
            yield url
        finally:
            stop(server)


def stop(process: subprocess.Popen, timeout_s: float = 15) -> None:
    """Terminate a server we started, by its own PID; kill it if it lingers."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stop_ray_head(head: subprocess.Popen, gcs_port: int) -> None:
    """Stop a ``ray start --head --block`` we started (it stops its node's processes as it exits) and drop
    the address record ``ray start`` left for later ``ray.init()`` calls, if it is this head's."""
    stop(head, timeout_s=60)
    record = Path("/tmp/ray/ray_current_cluster")
    if record.exists() and record.read_text().strip().endswith(f":{gcs_port}"):
        record.unlink()


def submit_job(address: str, entrypoint: list[str], env: dict, cwd: Path, *, runtime_env: dict | None = None,
               timeout_s: float = 900) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir .`` of ``entrypoint`` to the dashboard at ``address``, waiting for the
    job's end; retried while the head's job agent has not registered yet (the dashboard answers before it)."""
    import json

    command = ["ray", "job", "submit", f"--address={address}", "--working-dir=.",
               f"--runtime-env-json={json.dumps(runtime_env or {})}", "--", *entrypoint]
    for _ in range(30):
        run = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if "No available agent to submit job" not in run.stderr + run.stdout:
            break
        time.sleep(2)
    return run
