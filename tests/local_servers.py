"""Starting and stopping the real servers tests talk to (moto S3, mlflow server, a Ray head) on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
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


def stop(process: subprocess.Popen, timeout_s: float = 15) -> None:
    """Terminate a server we started, by its own PID; kill it if it lingers."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
