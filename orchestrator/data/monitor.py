"""The stream's bookkeeping actor: what each shard yielded, lost and had consumed, and the error budget.

One :class:`DataStreamMonitor` actor per stream, named so that Ray Data tasks, decode actors and Train
workers all find it; it lives on the node of the process that creates it (Ray Train's controller). Its
set of complete shards is the shard-level part of the resumable :class:`~orchestrator.data.position.DataPosition`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from orchestrator.data.position import StreamProgress

SAMPLE_ERRORS = ("missing_caption", "missing_image", "bad_json", "decode_error")

MONITOR_NAMESPACE = "rayclip-data"  # explicit, so Train workers and Data actors find the monitor by name


class DataErrorBudgetExceeded(RuntimeError):
    """Too many bad samples or lost shards in one epoch; the message names the shards at fault."""


def get_monitor(name: str):
    """The handle of the named monitor actor (from any process of the cluster)."""
    import ray

    return ray.get_actor(name, namespace=MONITOR_NAMESPACE)


class DataStreamMonitor:
    """Counts of the stream (run as one Ray actor): what each shard yielded, lost and had consumed.

    A shard of an epoch is *complete* once its consumed + decode-dropped samples reach what the read stage
    yielded; the set of complete shards is the resumable position. Bad or lost samples are charged to their
    epoch; past ``max_error_fraction`` of the manifest's samples the monitor records a failure naming the
    shards, which every consumer then raises.
    """

    def __init__(self, shard_names: list[str], samples_per_epoch: int, max_error_fraction: float,
                 progress: StreamProgress | None = None):
        progress = progress or StreamProgress()
        self.shard_names = shard_names
        self.samples_per_epoch = samples_per_epoch
        self.max_error_fraction = max_error_fraction
        self.first_epoch = progress.epoch
        index = {name: i for i, name in enumerate(shard_names)}
        self.complete = {(epoch, index[name]) for epoch, names in progress.completed.items() for name in names}
        self.yielded, self.dropped, self.consumed = {}, Counter(), Counter()
        self.counters = Counter()
        self.bad_by_epoch = Counter()
        self.shard_problems: dict[str, list[str]] = defaultdict(list)
        self.failure: str | None = None

    def record_read(self, epoch: int, shard: int, report: dict) -> None:
        self.yielded[(epoch, shard)] = report["yielded"]
        name = self.shard_names[shard]
        for kind, count in report["errors"].items():
            self._charge(epoch, name, kind, count)
        self.counters["shards_read"] += 1
        self.counters["read_retries"] += report["failed_attempts"] - int(report["skipped"])
        self.counters["samples_read"] += report["yielded"]
        if report["skipped"]:
            self.counters["skipped_shards"] += 1
            self._charge(epoch, name, "samples_in_skipped_shards", report["lost"], report["error"])
        elif report["truncated"]:
            self.counters["truncated_shards"] += 1
            self._charge(epoch, name, "samples_lost_to_truncation", report["lost"])
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
            self._update_completion(epoch, shard)
        return self.failure

    def _charge(self, epoch: int, shard_name: str, kind: str, count: int, detail: str | None = None) -> None:
        if count <= 0:
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

    def get_counters(self) -> dict[str, int]:
        """Error and progress counters, flat, for MLflow (``data/<name>``)."""
        names = ("shards_read", "samples_read", "samples_consumed", "read_retries", "skipped_shards",
                 "truncated_shards", "samples_lost_to_truncation", "samples_in_skipped_shards", *SAMPLE_ERRORS)
        return {name: int(self.counters[name]) for name in names}

    def get_problem_shards(self) -> dict[str, list[str]]:
        return dict(self.shard_problems)

    def get_position(self) -> StreamProgress:
        """The shard-level position: the first epoch with unconsumed shards and the shards complete from it on."""
        epoch = self.first_epoch
        while all((epoch, shard) in self.complete for shard in range(len(self.shard_names))):
            epoch += 1
        completed: dict[int, set[str]] = defaultdict(set)
        for done_epoch, shard in self.complete:
            if done_epoch >= epoch:
                completed[done_epoch].add(self.shard_names[shard])
        return StreamProgress(epoch, {e: frozenset(names) for e, names in completed.items()})


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


def stream_position(monitor_name: str) -> StreamProgress:
    """The stream's shard-level position (part of the :class:`DataPosition` a checkpoint saves)."""
    import ray

    return ray.get(get_monitor(monitor_name).get_position.remote())
