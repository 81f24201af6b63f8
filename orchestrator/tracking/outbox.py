"""MLflow writes that survive an outage: queued in order, sent by one background thread, retried with backoff.

Training never waits on MLflow: a write is queued and the step goes on. While the store does not answer
(a restarted server, a network blip, a locked sqlite file), the thread retries the oldest write with
exponential backoff and everything behind it waits its turn, so nothing is lost and the order is kept; one
line says when the store went away and one when it came back. The queue is bounded: past
``max_pending_values`` metric values the oldest ones are dropped and counted. A write the store *rejects*
(a bad parameter, a run that does not exist) is not retried: it is dropped, counted and said once.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import requests
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from sqlalchemy.exc import OperationalError

from orchestrator.logs import get_logger

logger = get_logger("tracking")

MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit
# Error codes an MLflow store answers while it is down or overloaded (a dead HTTP server is INTERNAL_ERROR too).
_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
_BACKOFF_S = (1, 2, 4, 8, 15, 30)


def short_reason(error: BaseException) -> str:
    """Why a call failed, in a few words (MLflow wraps a refused connection in a paragraph)."""
    text = str(error)
    for words in ("Connection refused", "timed out", "Name or service not known", "database is locked"):
        if words in text:
            return words.lower()
    return text.splitlines()[0][:160] if text else type(error).__name__


def is_transient(error: BaseException) -> bool:
    """Whether a failed MLflow call may succeed later (an unreachable or overloaded store, a locked sqlite file);
    a store that refuses the write, or a file that is no database, will refuse it again."""
    if isinstance(error, MlflowException):
        return error.error_code in _TRANSIENT_CODES
    return isinstance(error, (requests.RequestException, OSError, OperationalError))


@dataclass
class _Write:
    what: str
    """For messages: "metrics of steps 10-20", "plots of heldout at step 200", ..."""
    send: Callable | None = None
    """Called with the client (any write but metrics)."""
    metrics: list[Metric] = field(default_factory=list)
    at_redone_steps: bool = False
    """Metric values sent even at a step logged before a restart (facts about the restart itself)."""

    @property
    def values(self) -> int:
        return len(self.metrics)


@dataclass
class OutboxReport:
    """What reached the store and what did not, for the run's summary."""

    sent_values: int = 0
    pending_values: int = 0
    dropped_values: int = 0
    skipped_values: int = 0
    """Values of steps logged before a restart (redone steps are logged once)."""
    pending: list[str] = field(default_factory=list)
    """The writes still queued (what they were)."""
    rejected: list[str] = field(default_factory=list)
    outage_s: float = 0.0


class Outbox:
    """The queue of MLflow writes of one run and the thread that sends them (rank 0 of the Train workers)."""

    def __init__(self, client_factory: Callable, uri: str, run_id: Callable[[], str | None], *,
                 max_pending_values: int = 200_000):
        self._client_factory, self.uri, self.max_pending_values = client_factory, uri, max_pending_values
        self._run_id = run_id
        """The run metric values go to (known once the run's start write has been sent)."""
        self._queue: collections.deque[_Write] = collections.deque()
        self._sending: _Write | None = None
        self._deadline: float | None = None
        self._lock = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.report = OutboxReport()
        self.skip_through_step: int | None = None
        """Metric values of steps up to this one are not sent (they were logged before a restart)."""
        self._down_since: float | None = None

    def put(self, what: str, send: Callable) -> None:
        """Queue one write (``send(client)``), behind everything queued before it."""
        self._enqueue(_Write(what, send=send))

    def put_metrics(self, metrics: list[Metric], *, at_redone_steps: bool = False) -> None:
        """Queue metric values; consecutive ones travel together in batches of up to 1,000.

        ``at_redone_steps`` values are sent even at a step already logged before a restart."""
        with self._lock:
            last = self._queue[-1] if self._queue else None
            if last is not None and last.send is None and last is not self._sending and \
                    last.at_redone_steps == at_redone_steps and last.values + len(metrics) <= MAX_BATCH_METRICS:
                last.metrics.extend(metrics)
                self._bound()
                self._lock.notify_all()
                return
        self._enqueue(_Write("metrics", metrics=list(metrics), at_redone_steps=at_redone_steps))

    def _enqueue(self, write: _Write) -> None:
        with self._lock:
            self._queue.append(write)
            self._bound()
            self._lock.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rayclip-mlflow-outbox", daemon=True)
            self._thread.start()

    def _bound(self) -> None:
        """Drop the oldest metric values beyond the bound (called with the lock held)."""
        excess = sum(w.values for w in self._queue) - self.max_pending_values
        for write in list(self._queue):
            if excess <= 0:
                break
            if write.send is None and write is not self._sending:
                if self.report.dropped_values == 0:
                    logger.warning("MLflow at %s has been unreachable too long: more than %d metric values wait; "
                                   "dropping the oldest ones", self.uri, self.max_pending_values)
                self._queue.remove(write)
                excess -= write.values
                self.report.dropped_values += write.values

    def _run(self) -> None:
        client, attempt = None, 0
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if not self._queue:
                    return
                self._sending = write = self._queue[0]
            try:
                client = client or self._client_factory()
                self._send(client, write)
            except Exception as error:  # noqa: BLE001 (every failure is either retried or counted)
                if not is_transient(error):
                    self._settle(write)
                    self._rejected(write, error)
                    continue
                self._went_down(error)
                with self._lock:
                    self._sending = None
                    self._lock.wait(timeout=_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
                    if self._closing_deadline_passed():
                        return
                attempt += 1
                continue
            attempt = 0
            self._settle(write)
            self.report.sent_values += write.values
            self._came_back()

    def _send(self, client, write: _Write) -> None:
        if write.send is not None:
            write.send(client)
            return
        skip = None if write.at_redone_steps else self.skip_through_step
        kept = [m for m in write.metrics if skip is None or m.step > skip]
        self.report.skipped_values += len(write.metrics) - len(kept)
        write.metrics = kept
        if kept:
            run_id = self._run_id()
            if run_id is None:
                raise MlflowException("the run was never created in the store", error_code=RESOURCE_DOES_NOT_EXIST)
            client.log_batch(run_id, metrics=kept)

    def _settle(self, write: _Write) -> None:
        with self._lock:
            if self._queue and self._queue[0] is write:
                self._queue.popleft()
            self._sending = None
            self._lock.notify_all()

    def _rejected(self, write: _Write, error: BaseException) -> None:
        reason = short_reason(error)
        if not any(entry.endswith(f": {reason}") for entry in self.report.rejected):  # the same refusal said once
            logger.warning("MLflow at %s rejected %s (%s); it is not retried, nor are later writes it refuses "
                           "for the same reason", self.uri, write.what, reason)
        self.report.rejected.append(f"{write.what}: {reason}")

    def _went_down(self, error: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.warning("MLflow at %s does not answer (%s); training goes on, what it logs waits and is "
                           "retried with backoff", self.uri, short_reason(error))

    def _came_back(self) -> None:
        if self._down_since is not None:
            down = time.monotonic() - self._down_since
            self.report.outage_s += down
            self._down_since = None
            logger.info("MLflow at %s answers again after %.0f s; the writes that waited are sent", self.uri, down)

    def _closing_deadline_passed(self) -> bool:
        return self._closing and self._deadline is not None and time.monotonic() >= self._deadline

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued write is sent (True) or ``timeout_s`` passes (False)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._queue and time.monotonic() < deadline:
                self._lock.notify_all()  # a sender waiting out its backoff tries again now
                self._lock.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            return not self._queue

    def close(self, timeout_s: float) -> OutboxReport:
        """Send what is queued within ``timeout_s``, stop the thread, and say what did not reach the store."""
        sent_all = self.flush(timeout_s)
        with self._lock:
            self._closing, self._deadline = True, time.monotonic()
            self._lock.notify_all()
            if not sent_all:
                self.report.pending_values = sum(w.values for w in self._queue)
                self.report.pending = [w.what for w in self._queue if w.send is not None]
        if self._thread is not None:
            self._thread.join(timeout=5)
        return self.report

    def pending_metrics(self) -> list[dict]:
        """The metric values not sent (after :meth:`close`), as plain records to keep in a file."""
        with self._lock:
            return [{"run_id": self._run_id(), "key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                    for w in self._queue if w.send is None for m in w.metrics]
