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
    """Ray's ``worker_process_setup_hook`` on a cluster rayclip starts: lines of Ray's own actors that
    tell a user nothing to act on, silenced by their message (everything else still shows)."""
    drop_records("ray.data._internal.progress", "Progress bars disabled")  # the demo turns them off on purpose
    # Ray Train's cleaner says so each time a run's controller is gone (every trial of a search ends that way).
    drop_records("ray.train.v2._internal.execution.controller.placement_group_cleaner",
                 "Detected that the Ray Train controller actor")
    # Ray Data's own DatasetManager sets the option it deprecates (Ray 2.60).
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated")


# Lines Ray's C++ core and raylet print in every run, about Ray's own actors and worker pool, that a user
# cannot act on: an actor whose constructor arguments live in the object store may not restart (ray #53727;
# Ray Train's and Ray Data's internal actors), and a 2-core laptop starting more Python workers than cores.
RAY_NOISE = ("has constructor arguments in the object store and max_restarts > 0",
             "PYTHON worker processes have been started on node")


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
