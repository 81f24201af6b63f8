"""The outbox that keeps MLflow writes through an outage: order kept, nothing lost, memory bounded, refusals not
retried, redone steps sent once. The store is a stand-in that goes down and comes back on command (what is under
test is the queue, not MLflow; the real server outage is in tests/integration/test_run_trust.py)."""

from __future__ import annotations

import logging
import threading
import time

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from orchestrator.tracking import Outbox
from tests.factories import rayclip_records


class Store:
    """Records what arrives; while ``down``, every call fails as an unreachable MLflow server's does."""

    def __init__(self):
        self.down = threading.Event()
        self.metrics: list[tuple[str, int]] = []
        self.calls: list[str] = []

    def log_batch(self, run_id, metrics):
        if self.down.is_set():
            raise MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow/runs/log-batch failed with "
                                  "exception ... [Errno 111] Connection refused", error_code=INTERNAL_ERROR)
        self.metrics += [(m.key, m.step) for m in metrics]


def metrics(step: int, *keys: str) -> list[Metric]:
    return [Metric(key, float(step), 0, step) for key in keys or ("loss",)]


def test_an_outage_loses_nothing_and_keeps_the_order(caplog):
    store = Store()
    outbox = Outbox(lambda: store, "http://127.0.0.1:9", lambda: "run")
    with rayclip_records(caplog, logging.INFO) as records:
        outbox.put_metrics(metrics(1))
        assert outbox.flush(5)
        store.down.set()
        for step in range(2, 30):
            outbox.put_metrics(metrics(step))
        outbox.put("the plots", lambda client: client.calls.append("plots"))
        time.sleep(1.5)  # the sender meets the outage and waits
        store.down.clear()
        report = outbox.close(30)
    assert [step for _, step in store.metrics] == list(range(1, 30)) and store.calls == ["plots"]
    assert report.sent_values == 29 and report.pending_values == 0 and report.outage_s > 0
    lines = [r.getMessage() for r in records if r.name == "rayclip.tracking"]
    assert len(lines) == 2 and "does not answer (connection refused)" in lines[0] and "answers again" in lines[1]


def test_past_its_bound_the_outbox_drops_the_oldest_values_and_counts_them(caplog):
    store = Store()
    store.down.set()
    outbox = Outbox(lambda: store, "http://127.0.0.1:9", lambda: "run", max_pending_values=10)
    with rayclip_records(caplog) as records:
        for step in range(25):
            outbox.put_metrics(metrics(step))
            outbox.put("a file", lambda client: None)  # writes in between keep every step its own batch
        report = outbox.close(0.5)
    assert report.dropped_values == 15 and report.pending_values == 10
    assert [m["step"] for m in outbox.pending_metrics()] == list(range(15, 25))
    assert sum("dropping the oldest" in r.getMessage() for r in records) == 1


def test_a_refused_write_is_not_retried_and_the_rest_still_goes(caplog):
    store = Store()
    outbox = Outbox(lambda: store, "http://127.0.0.1:9", lambda: "run")

    def refused(client):
        raise MlflowException("Invalid value for param 'x'", error_code=INVALID_PARAMETER_VALUE)

    with rayclip_records(caplog) as records:
        outbox.put("the params", refused)
        outbox.put_metrics(metrics(1))
        report = outbox.close(10)
    assert report.rejected == ["the params: Invalid value for param 'x'"] and store.metrics == [("loss", 1)]
    assert len(records) == 1


def test_steps_logged_before_a_restart_are_not_sent_again():
    store = Store()
    outbox = Outbox(lambda: store, "http://127.0.0.1:9", lambda: "run")
    outbox.skip_through_step = 7
    for step in range(5, 12):
        outbox.put_metrics(metrics(step, "loss", "lr"))
    report = outbox.close(10)
    assert sorted({step for _, step in store.metrics}) == [8, 9, 10, 11]
    assert report.skipped_values == 6 and report.sent_values == 8


def test_facts_about_the_restart_are_sent_at_a_redone_step():
    """What a resize cost is known at the first step after it, which is a step trained again."""
    store = Store()
    outbox = Outbox(lambda: store, "http://127.0.0.1:9", lambda: "run")
    outbox.skip_through_step = 7
    outbox.put_metrics(metrics(5, "loss"))
    outbox.put_metrics(metrics(5, "scaling/resize_seconds_lost"), at_redone_steps=True)
    outbox.put_metrics(metrics(6, "loss"))
    report = outbox.close(10)
    assert store.metrics == [("scaling/resize_seconds_lost", 5)]
    assert report.skipped_values == 2 and report.sent_values == 1
