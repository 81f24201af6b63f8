"""The stream's bookkeeping actor: what each shard yielded, lost and had consumed, and the error budget.

One :class:`DataStreamMonitor` actor per stream, named so that Ray Data tasks, decode actors and Train
workers all find it; it lives on the node of the process that creates it (Ray Train's controller). Its
set of complete shards is the shard-level part of the resumable :class:`~orchestrator.data.position.DataPosition`.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from orchestrator.data.position import StreamProgress
from orchestrator.data.visits import VisitTable
from orchestrator.failures import CannotHeal

SAMPLE_ERRORS = ("missing_caption", "missing_image", "bad_json", "decode_error")
SAMPLE_ERROR_WORDS = {"decode_error": ("undecodable image", "undecodable images"),
                      "missing_caption": ("without caption", "without caption"),
                      "missing_image": ("without image", "without image"),
                      "bad_json": ("with unreadable JSON", "with unreadable JSON")}

RATE_INTERVAL_S = 5.0  # how often the consumption rate behind the read-ahead window is measured
STALL_S = 2.0  # without consumption for this long, the read-ahead bound lets one more shard be read

MONITOR_NAMESPACE = "rayclip-data"  # explicit, so Train workers and Data actors find the monitor by name


class DataErrorBudgetExceeded(CannotHeal, RuntimeError):
    """Too many bad samples or lost shards in one epoch; the message names the shards at fault."""


def get_monitor(name: str):
    """The handle of the named monitor actor (from any process of the cluster)."""
    import ray

    return ray.get_actor(name, namespace=MONITOR_NAMESPACE)


@dataclass(frozen=True)
class ReadAhead:
    """How far the read stage may run ahead of training, in samples (None: unbounded).

    The window is ``floor`` (what the pipeline's own buffers hold: below it the stream could stall) plus
    ``seconds`` of consumption at the rate training has shown, or ``fixed`` when configured in batches.
    """

    floor: int | None = None
    seconds: float = 0.0
    fixed: int | None = None

    def window(self, rate: float) -> float | None:
        if self.floor is None:
            return None
        if self.fixed is not None:
            return max(self.floor, self.fixed)
        return self.floor + rate * self.seconds


class DataStreamMonitor:
    """Counts of the stream (run as one Ray actor): what each visit yielded, lost and had consumed.

    A visit (a shard's pass in an epoch, see :mod:`orchestrator.data.visits`) is *complete* once its
    consumed + decode-dropped samples reach what the read stage yielded; the set of complete visits is
    the resumable position. Bad or lost samples are charged to their epoch; past ``max_error_fraction``
    of the epoch's samples the monitor records a failure naming the shards, which every consumer then
    raises. Read tasks ask :meth:`has_room` before they open a shard: the read-ahead bound (so the stream
    reads at most the window plus one shard per read task ahead of training).
    """

    def __init__(self, table: VisitTable, seed: int, max_error_fraction: float,
                 progress: StreamProgress | None = None, read_ahead: ReadAhead | None = None):
        progress = progress or StreamProgress()
        self.table, self.seed = table, seed
        self.shard_names = table.names
        self.samples_per_epoch = table.samples_per_epoch
        self.max_error_fraction = max_error_fraction
        self.read_ahead = read_ahead or ReadAhead()
        self.first_epoch = progress.epoch
        index = {name: i for i, name in enumerate(self.shard_names)}
        self.complete = {(epoch, index[name]) for epoch, names in progress.completed.items() for name in names}
        self.epoch_members: dict[int, frozenset[int]] = {}
        self.yielded, self.dropped, self.consumed = {}, Counter(), Counter()
        self.counters = Counter()
        self.by_source = Counter()
        self.bad_by_epoch = Counter()
        self.shard_problems: dict[str, list[str]] = defaultdict(list)
        self.failure: str | None = None
        self.rate_mark = None  # (time, samples consumed) of the last rate measurement
        self.rate = 0.0
        self.last_progress = self.last_stall_pass = time.monotonic()

    def _source(self, visit: int) -> str:
        return self.table.source_names[self.table.visits[visit].source]

    def record_block(self, visit: int, samples: int) -> None:
        """A read task passed on a block of ``samples`` (counted as read at once: the read-ahead bound)."""
        self.counters["samples_read"] += samples
        self.by_source[f"{self._source(visit)}/samples_read"] += samples

    def has_room(self) -> bool:
        """Whether a read task may open its shard: samples read but not yet consumed are below the window.

        Past the window, one read task is still let through per ``STALL_S`` in which nothing was consumed:
        Ray Data hands a task's output on when the task ends, and a task that reads several plan rows may
        hold the samples training waits for while it waits here. So the bound can never stall the stream,
        and without training progress it reads at most one shard per ``STALL_S`` ahead.
        """
        window = self.read_ahead.window(self.rate)
        in_flight = self.counters["samples_read"] - self.counters["samples_consumed"] - self.counters["decode_error"]
        if window is None or in_flight < window:
            return True
        now = time.monotonic()
        if now - max(self.last_progress, self.last_stall_pass) > STALL_S:
            self.last_stall_pass = now
            self.counters["read_ahead_stall_passes"] += 1
            return True
        return False

    def record_read(self, epoch: int, shard: int, report: dict) -> None:
        self.yielded[(epoch, shard)] = report["yielded"]
        name = self.shard_names[shard]
        for kind, count in report["errors"].items():
            self._charge(epoch, name, kind, count)
        self.counters["shards_read"] += 1
        self.counters["read_retries"] += report["failed_attempts"] - int(report["skipped"])
        if report["skipped"]:
            self.counters["skipped_shards"] += 1
            self._charge(epoch, name, "samples_in_skipped_shards", report["lost"], report["error"])
        elif report["truncated"]:
            self.counters["truncated_shards"] += 1
            self._charge(epoch, name, "samples_lost_to_truncation", report["lost"], report["error"])
        elif report["count_gap"]:  # the counts the plan used were wrong: reported, not an error of the data
            gap = report["count_gap"]
            self.counters["count_mismatch_shards"] += 1
            self.counters["samples_beyond_count" if gap > 0 else "samples_short_of_count"] += abs(gap)
            self.shard_problems[name].append(f"epoch {epoch}: holds {gap:+d} samples against its listed count")
        self._update_completion(epoch, shard)

    def record_decode_errors(self, dropped: dict[tuple[int, int], int]) -> None:
        for (epoch, shard), count in dropped.items():
            self.dropped[(epoch, shard)] += count
            self._charge(epoch, self.shard_names[shard], "decode_error", count)
            self._update_completion(epoch, shard)

    def record_consumed(self, consumed: dict[tuple[int, int], int]) -> str | None:
        for (epoch, shard), count in consumed.items():
            self.consumed[(epoch, shard)] += count
            self.counters["samples_consumed"] += count
            self.by_source[f"{self._source(shard)}/samples_consumed"] += count
            self._update_completion(epoch, shard)
        self.last_progress = time.monotonic()
        self._measure_rate()
        return self.failure

    def _measure_rate(self) -> None:
        now, total = time.monotonic(), self.counters["samples_consumed"]
        if self.rate_mark is None:
            self.rate_mark = (now, total)
        elif now - self.rate_mark[0] >= RATE_INTERVAL_S:
            self.rate = (total - self.rate_mark[1]) / (now - self.rate_mark[0])
            self.rate_mark = (now, total)

    def _charge(self, epoch: int, shard_name: str, kind: str, count: int, detail: str | None = None) -> None:
        if count <= 0 and detail is None:  # a damaged shard is named even where it lost nothing
            return
        self.counters[kind] += count
        self.bad_by_epoch[epoch] += count
        self.shard_problems[shard_name].append(f"epoch {epoch}: {count} {kind}" + (f" ({detail})" if detail else ""))
        limit = self.max_error_fraction * self.samples_per_epoch
        if self.failure is None and self.bad_by_epoch[epoch] > limit:
            shards = "; ".join(f"{name}: {', '.join(problems)}" for name, problems in self.shard_problems.items())
            self.failure = (f"data error budget exceeded in epoch {epoch}: {self.bad_by_epoch[epoch]} bad or lost "
                            f"samples > max_error_fraction={self.max_error_fraction} of {self.samples_per_epoch}; "
                            f"shards: {shards}")

    def _update_completion(self, epoch: int, shard: int) -> None:
        key = (epoch, shard)
        if key in self.yielded and self.consumed[key] + self.dropped[key] >= self.yielded[key]:
            self.complete.add(key)

    def get_failure(self) -> str | None:
        return self.failure

    def get_visit_names(self) -> list[str]:
        return list(self.shard_names)

    def get_counters(self) -> dict[str, int]:
        """Error and progress counters, flat, for MLflow (``data/<name>``; per source ``data/source/<name>/...``)."""
        names = ("shards_read", "samples_read", "samples_consumed", "read_retries", "skipped_shards",
                 "truncated_shards", "samples_lost_to_truncation", "samples_in_skipped_shards",
                 "count_mismatch_shards", "samples_beyond_count", "samples_short_of_count",
                 "read_ahead_stall_passes", *SAMPLE_ERRORS)
        counters = {name: int(self.counters[name]) for name in names}
        if len(self.table.source_names) > 1:
            counters.update({f"source/{key}": int(value) for key, value in sorted(self.by_source.items())})
        return counters

    def get_problem_shards(self) -> dict[str, list[str]]:
        return dict(self.shard_problems)

    def _members(self, epoch: int) -> frozenset[int]:
        if epoch not in self.epoch_members:
            self.epoch_members[epoch] = frozenset(self.table.epoch_visits(self.seed, epoch))
        return self.epoch_members[epoch]

    def get_position(self) -> StreamProgress:
        """The visit-level position: the first epoch with unconsumed visits and the visits complete from it on."""
        epoch = self.first_epoch
        while all((epoch, visit) in self.complete for visit in self._members(epoch)):
            epoch += 1
        completed: dict[int, set[str]] = defaultdict(set)
        for done_epoch, shard in self.complete:
            if done_epoch >= epoch:
                completed[done_epoch].add(self.shard_names[shard])
        return StreamProgress(epoch, {e: frozenset(names) for e, names in completed.items()})


def _counted(count: int, singular: str, plural: str | None = None) -> str:
    return f"{count:,} {singular if count == 1 else plural or singular + 's'}"


def data_health_line(counters: dict[str, float]) -> str | None:
    """One line for people on what the stream skipped, lost or found miscounted; None where the data was clean.

    ``counters`` are :func:`stream_counters` (:meth:`DataStreamMonitor.get_counters`), with or without the
    ``data/`` prefix of their MLflow names, e.g. ``data: 14 bad samples skipped (12 undecodable images, 2 without
    caption); 250 samples lost to shards cut short (1 read); 2,000 samples in unreadable shards (1 read); 1 shard
    read off the listed count (-12 samples)``.
    """
    count = Counter({name.removeprefix("data/"): int(value) for name, value in counters.items()})
    parts = []
    bad = sorted((kind for kind in SAMPLE_ERROR_WORDS if count[kind]), key=lambda kind: -count[kind])
    if bad:
        kinds = ", ".join(_counted(count[kind], *SAMPLE_ERROR_WORDS[kind]) for kind in bad)
        parts.append(f"{_counted(sum(count[kind] for kind in bad), 'bad sample')} skipped ({kinds})")
    # Shards count per read: a damaged shard is read (and counted) again in every epoch.
    if count["truncated_shards"]:
        lost = _counted(count["samples_lost_to_truncation"], "sample")
        parts.append(f"{lost} lost to shards cut short ({_counted(count['truncated_shards'], 'read')})")
    if count["skipped_shards"]:
        lost = _counted(count["samples_in_skipped_shards"], "sample")
        parts.append(f"{lost} in unreadable shards ({_counted(count['skipped_shards'], 'read')})")
    if count["count_mismatch_shards"]:
        gaps = ", ".join(f"{sign}{n:,}" for sign, n in (("+", count["samples_beyond_count"]),
                                                         ("-", count["samples_short_of_count"])) if n)
        parts.append(f"{_counted(count['count_mismatch_shards'], 'shard read')} off the listed count ({gaps} samples)")
    return "data: " + "; ".join(parts) if parts else None


def control_actor_options(name: str, namespace: str) -> dict[str, Any]:
    """Options for a named bookkeeping actor: no CPU, and on the node of the process that creates it.

    The stream's actors are created by Ray Train's controller, which Ray keeps on the driver's node. Left
    to the default scheduler they can land on a training node, and dying with that node they would take
    the stream's position and counters with them, so no restarted worker group could start.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return dict(name=name, namespace=namespace, num_cpus=0, scheduling_strategy=here)


def stream_counters(monitor_name: str) -> dict[str, int]:
    """Error/progress counters of a stream, e.g. to log as MLflow metrics ``data/<name>``."""
    import ray

    return ray.get(get_monitor(monitor_name).get_counters.remote())


def stream_visit_names(monitor_name: str) -> list[str]:
    """The position key of each visit index (the ``shard_index`` column of the stream's batches)."""
    import ray

    return ray.get(get_monitor(monitor_name).get_visit_names.remote())


def stream_position(monitor_name: str) -> StreamProgress:
    """The stream's shard-level position (part of the :class:`DataPosition` a checkpoint saves)."""
    import ray

    return ray.get(get_monitor(monitor_name).get_position.remote())
