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


def duration(seconds: float) -> str:
    """``42 s``, ``7 min 5 s`` or ``3 h 20 min``: an ETA a person reads at a glance."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


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


def drop_forwarded_lines(*fragments: str) -> None:
    """Lines Ray forwards to this driver (its processes' output, the raylet's warnings) that contain
    ``fragments`` are not printed; every other line is. C++ log lines have no Python logger to filter: this
    wraps the one function of Ray's driver that prints them all (idempotent)."""
    from ray._private import worker

    printer = worker.print_worker_logs
    if getattr(printer, "dropped_fragments", None) == fragments:
        return

    def print_kept(data: dict, *args, **kwargs) -> None:
        kept = [line for line in data["lines"] if not any(fragment in line for fragment in fragments)]
        if kept:
            printer({**data, "lines": kept}, *args, **kwargs)

    print_kept.dropped_fragments = fragments
    worker.print_worker_logs = print_kept
