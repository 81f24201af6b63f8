"""What an epoch is: the shard *visits* of every source, weighted, in a seeded order.

A source of weight ``w`` visits each of its shards ``floor(w)`` times per epoch, plus, for the fraction
``w - floor(w)``, once more for a seeded subset of ``round(fraction x shards)`` of them (a different
subset each epoch). So with weights 2 and 1, an epoch streams source A's shards twice and B's once (A's
share of samples is 2 x A / (2 x A + B)); weight 0.5 streams a seeded half of the shards per epoch. One
source of weight 1 is a plain pass over its shards. The epoch's visits are then put in one seeded order
(all sources interleaved), a pure function of (seed, epoch), so a resumed run replays it.

Each visit has a name, the key of the resumable position: the shard's name for a single source,
``<source>/<shard>`` for several, and ``#k`` appended for a shard's k-th extra visit in an epoch.
Plans are made by Ray Train's controller; the monitor actor evaluates the same functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from orchestrator.data.position import StreamProgress


@dataclass(frozen=True)
class Visit:
    """One visit slot: a shard of a source, its repeat number in an epoch, and its position key."""

    name: str
    url: str
    samples: int
    source: int  # index into the stream's sources
    shard: int  # index of the shard in its source
    repeat: int


@dataclass(frozen=True)
class VisitTable:
    """Every visit slot of the stream and the sources' weights and names (enough to plan any epoch)."""

    visits: tuple[Visit, ...]
    weights: tuple[float, ...]
    source_names: tuple[str, ...]
    shards_per_source: tuple[int, ...]

    @classmethod
    def of_sources(cls, sources: Sequence) -> VisitTable:
        """From resolved sources (``SourceShards``: ``name``, ``weight``, ``shards`` of url/name/samples)."""
        several = len(sources) > 1
        visits = []
        for index, source in enumerate(sources):
            for shard_index, shard in enumerate(source.shards):
                base = f"{source.name}/{shard.name}" if several else shard.name
                for repeat in range(math.ceil(source.weight)):
                    name = f"{base}#{repeat}" if repeat else base
                    visits.append(Visit(name, shard.url, shard.samples, index, shard_index, repeat))
        return cls(tuple(visits), tuple(float(s.weight) for s in sources), tuple(s.name for s in sources),
                   tuple(len(s.shards) for s in sources))

    @property
    def names(self) -> list[str]:
        return [visit.name for visit in self.visits]

    @property
    def samples_per_epoch(self) -> int:
        """Expected samples per epoch (exact when every weight is whole)."""
        totals = [0] * len(self.weights)
        for visit in self.visits:
            if visit.repeat == 0:
                totals[visit.source] += visit.samples
        return round(sum(weight * total for weight, total in zip(self.weights, totals)))

    def epoch_visits(self, seed: int, epoch: int) -> list[int]:
        """Indices of the visits of ``epoch``, in streaming order (see the module docstring)."""
        extra: list[set[int]] = []
        for source, (weight, count) in enumerate(zip(self.weights, self.shards_per_source)):
            fraction = weight - math.floor(weight)
            chosen = np.random.default_rng([seed, epoch, source]).permutation(count)[: round(fraction * count)]
            extra.append({int(i) for i in chosen})
        members = [index for index, visit in enumerate(self.visits)
                   if visit.repeat < math.floor(self.weights[visit.source])
                   or (visit.repeat == math.floor(self.weights[visit.source]) and visit.shard in extra[visit.source])]
        order = np.random.default_rng([seed, epoch]).permutation(len(members))
        return [members[int(i)] for i in order]


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard permutation of one epoch of a single weight-1 source (what :meth:`epoch_visits` gives)."""
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_shards)]


def plan_epochs(table: VisitTable, seed: int, epochs: int, position: StreamProgress | None = None) -> list[dict]:
    """Plan rows (epoch, visit index, shard URL, expected samples) still to stream from ``position``."""
    position = position or StreamProgress()
    known = set(table.names)
    unknown = sorted(n for names in position.completed.values() for n in names if n not in known)
    if unknown:
        raise ValueError(f"data position names shards not in this shard set: {unknown[:5]}")
    rows = []
    for epoch in range(position.epoch, epochs):
        done = position.completed.get(epoch, frozenset())
        rows += [{"epoch": epoch, "visit": index, "url": table.visits[index].url,
                  "samples": table.visits[index].samples}
                 for index in table.epoch_visits(seed, epoch) if table.visits[index].name not in done]
    return rows
