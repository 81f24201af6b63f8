"""Where a data stream stands: one typed object, saved in every checkpoint, that a resumed run starts from.

Two levels, because shards are the stream's unit of work but batches are cut from samples:

* :class:`StreamProgress`, the shard level, kept by the stream's monitor actor: the first epoch that
  still has unconsumed shards and, from that epoch on, the shards already consumed whole. A resumed
  stream plans only the shards still to come.
* :class:`DataPosition` adds the samples already trained on from shards consumed only in part (their
  ordinals in the tar, per epoch and shard, as inclusive runs): those shards are streamed again and the
  training workers filter these samples out, so no sample is trained twice. Optionally it carries an
  audit list of every consumed sample (``checkpoint.audit_sample_ids``), which tests use as proof.

JSON (``train_state.json``)::

    {"stream": {"epoch": 1, "completed": {"1": ["00003.tar"]}},
     "consumed": {"1": {"00005.tar": [[0, 127], [256, 300]]}},
     "audit": ["1:00003.tar:17", ...]}            # only with audit_sample_ids
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

ShardKey = tuple[int, str]  # (epoch, shard name)


@dataclass(frozen=True)
class StreamProgress:
    """The shard-level position: ``epoch`` is the first epoch with unconsumed shards; ``completed`` names,
    per epoch from ``epoch`` on, the shards consumed whole."""

    epoch: int = 0
    completed: dict[int, frozenset[str]] = field(default_factory=dict)

    def is_complete(self, epoch: int, shard: str) -> bool:
        return epoch < self.epoch or shard in self.completed.get(epoch, frozenset())

    def merge(self, other: StreamProgress) -> StreamProgress:
        """The union of two views of one stream (progress only grows, so the union is never behind)."""
        epoch = max(self.epoch, other.epoch)
        completed: dict[int, frozenset[str]] = {}
        for source in (self.completed, other.completed):
            for done_epoch, names in source.items():
                if done_epoch >= epoch:
                    completed[done_epoch] = completed.get(done_epoch, frozenset()) | names
        return StreamProgress(epoch, completed)

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "completed": {str(e): sorted(n) for e, n in sorted(self.completed.items()) if n}}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> StreamProgress:
        data = data or {}
        completed = {int(e): frozenset(names) for e, names in (data.get("completed") or {}).items()}
        return cls(int(data.get("epoch", 0)), completed)


def to_runs(ordinals: Iterable[int]) -> list[tuple[int, int]]:
    """Ordinals as sorted inclusive (first, last) runs; what a worker consumed from a shard is mostly contiguous."""
    runs: list[list[int]] = []
    for value in sorted(set(ordinals)):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return [(first, last) for first, last in runs]


def from_runs(runs: Iterable[tuple[int, int]]) -> set[int]:
    return {value for first, last in runs for value in range(first, last + 1)}


@dataclass(frozen=True)
class DataPosition:
    """The resumable position of a training stream (see the module docstring)."""

    stream: StreamProgress = field(default_factory=StreamProgress)
    consumed: dict[ShardKey, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    """Per (epoch, shard name) of a partly consumed shard: the consumed ordinals as inclusive runs."""
    audit: tuple[str, ...] | None = None
    """``"epoch:shard:ordinal"`` of every sample consumed so far, when the run audits them."""

    @classmethod
    def of_samples(cls, stream: StreamProgress, samples: dict[ShardKey, Iterable[int]],
                   audit: Iterable[str] | None = None) -> DataPosition:
        """A position from raw consumed ordinals (a worker's view), pruned of shards ``stream`` has completed."""
        consumed = {key: tuple(to_runs(ids)) for key, ids in samples.items()}
        return cls(stream, consumed, None if audit is None else tuple(audit)).pruned()

    def consumed_ordinals(self) -> dict[ShardKey, set[int]]:
        """Membership sets of :attr:`consumed` (what a resumed worker filters out)."""
        return {key: from_runs(runs) for key, runs in self.consumed.items()}

    def merge(self, other: DataPosition) -> DataPosition:
        """Both positions' progress and consumed samples together (e.g. every rank's, or old and new)."""
        ordinals = self.consumed_ordinals()
        for key, ids in other.consumed_ordinals().items():
            ordinals[key] = ordinals.get(key, set()) | ids
        audit = None if self.audit is None and other.audit is None else (self.audit or ()) + (other.audit or ())
        return DataPosition.of_samples(self.stream.merge(other.stream), ordinals, audit)

    def pruned(self) -> DataPosition:
        """Without the consumed samples of shards the stream has completed (they are not streamed again)."""
        kept = {key: runs for key, runs in sorted(self.consumed.items()) if runs and not self.stream.is_complete(*key)}
        return DataPosition(self.stream, kept, self.audit)

    def to_json(self) -> dict[str, Any]:
        consumed: dict[str, dict[str, list[list[int]]]] = {}
        for (epoch, shard), runs in sorted(self.consumed.items()):
            consumed.setdefault(str(epoch), {})[shard] = [list(run) for run in runs]
        body: dict[str, Any] = {"stream": self.stream.to_json(), "consumed": consumed}
        if self.audit is not None:
            body["audit"] = list(self.audit)
        return body

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> DataPosition:
        """Read :meth:`to_json`'s layout; an empty or missing position is the start of the stream."""
        data = data or {}
        consumed = {(int(epoch), shard): tuple((int(a), int(b)) for a, b in runs)
                    for epoch, shards in (data.get("consumed") or {}).items() for shard, runs in shards.items()}
        audit = data.get("audit")
        return cls(StreamProgress.from_json(data.get("stream")), consumed, None if audit is None else tuple(audit))
