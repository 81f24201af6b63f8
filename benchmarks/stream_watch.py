"""Consuming a training stream in a benchmark without ever hanging on it (``data_pipeline.py``, ``read_ahead.py``).

The stream is iterated with ``iter_train_batches`` (so its monitor sees what is consumed, as in training) on
a thread; a stream that yields no first batch within ``start_s`` (its decode actors start in that time:
~20 s on a quiet 2-core machine, over a minute on a busy one) or no next batch within ``stall_s`` is
reported as stalled, with its counters, and ended by killing its monitor: the read tasks waiting at the
read-ahead bound then fail, and so does the iterator.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Watched:
    """How consuming a stream ended: ``stopped`` (by ``on_batch``), ``finished``, ``stalled`` or ``failed``."""

    outcome: str
    samples: int
    seconds: float
    counters: dict = field(default_factory=dict)  # the monitor's counters when it ended (before any kill)
    window: float | None = None  # the read-ahead window then (None: unbounded)
    detail: str | None = None


def _consume(stream, cfg, on_batch: Callable[[dict], bool], events: queue.Queue) -> None:
    from orchestrator.data import iter_train_batches

    try:
        for batch in iter_train_batches(stream.dataset, cfg, stream.monitor_name):
            stop = on_batch(batch)
            events.put(("batch", len(batch["image"])))
            if stop:
                events.put(("stopped", None))
                return
        events.put(("finished", None))
    except Exception as error:  # noqa: BLE001 - any failure of the stream is the result, reported
        events.put(("failed", f"{type(error).__name__}: {str(error)[:300]}"))


def consume_watched(stream, cfg, on_batch: Callable[[dict], bool], *, stall_s: float,
                    start_s: float = 180.0) -> Watched:
    """Feed every batch to ``on_batch`` (True: stop there) until the stream ends, stops or stalls."""
    import ray

    from orchestrator.data import stream_counters

    events: queue.Queue = queue.Queue()
    started, samples = time.monotonic(), 0
    consumer = threading.Thread(target=_consume, args=(stream, cfg, on_batch, events), daemon=True)
    consumer.start()
    while True:
        try:
            kind, value = events.get(timeout=stall_s if samples else max(start_s, stall_s))
        except queue.Empty:
            waited = stall_s if samples else max(start_s, stall_s)
            kind, value = "stalled", f"no batch for {waited:.0f} s after {samples} samples"
        if kind != "batch":
            break
        samples += value
    seconds = time.monotonic() - started
    counters = stream_counters(stream.monitor_name)
    window = ray.get(stream.monitor.__ray_call__.remote(lambda monitor: monitor.read_ahead.window(monitor.rate)))
    if kind == "stalled":
        ray.kill(stream.monitor)
    consumer.join(timeout=60)
    return Watched(kind, samples, seconds, counters, window, value)
