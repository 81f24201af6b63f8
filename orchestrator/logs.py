"""rayclip's one log channel: a ``logging`` logger per package under the ``rayclip`` root, for people.

Every process that logs (the job's driver, Ray Train's controller, each training worker, a Data actor)
calls :func:`setup_logging` once; lines read ``[rayclip] <message>`` on standard output, one per event a
user cares about (a step with its rate and ETA, an evaluation, a checkpoint, a resume). Ray forwards a
worker's standard output to the driver with the worker's name in front, so nothing else is added here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator

ROOT = "rayclip"
_FORMAT = "[rayclip] %(message)s"


class _RayclipHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (Ray and pytest replace it); one per process."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def get_logger(name: str) -> logging.Logger:
    """The logger of one part of rayclip, e.g. ``get_logger("train")`` -> ``rayclip.train``."""
    return logging.getLogger(f"{ROOT}.{name}")


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Send rayclip's records to standard output as ``[rayclip] message`` lines (idempotent).

    The root ``rayclip`` logger does not propagate: a library that configures Python's root logger (Ray
    does in its workers) must not print every line a second time.
    """
    root = logging.getLogger(ROOT)
    if not any(isinstance(handler, _RayclipHandler) for handler in root.handlers):
        handler = _RayclipHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    return root


class _DropByMessage(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def drop_records(logger_name: str, *prefixes: str) -> None:
    """Silence a third-party logger's records that start with ``prefixes`` (and only those), at their source."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropByMessage) and f.prefixes == prefixes for f in logger.filters):
        logger.addFilter(_DropByMessage(prefixes))


@contextlib.contextmanager
def without_printed_lines(*prefixes: str) -> Iterator[None]:
    """Run a block whose library prints status lines to stdout: lines starting with ``prefixes`` are
    dropped, every other line is printed as it would have been."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if not line.startswith(prefixes):
                sys.stdout.write(line + "\n")


def quiet_ray_driver() -> None:
    """Before a driver starts a local Ray: its notice that token auth is on (Ray's default since 2.59)."""
    drop_records("ray._private.authentication.authentication_token_setup", "Token authentication is enabled for this")


def quiet_ray_process() -> None:
    """Ray's ``worker_process_setup_hook`` on a cluster rayclip starts: two lines of Ray's own actors
    that tell a user nothing to act on, silenced by their message (everything else still shows)."""
    drop_records("ray.data._internal.progress", "Progress bars disabled")  # the demo turns them off on purpose
    # Ray Data's own DatasetManager sets the option it deprecates (Ray 2.60).
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated")
