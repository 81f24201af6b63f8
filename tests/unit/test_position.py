"""The typed data-stream position: merge, pruning of completed shards, JSON round trip."""

from __future__ import annotations

import json

from orchestrator.data import DataPosition, StreamProgress
from orchestrator.data.position import from_runs, to_runs


def test_runs_compress_consumed_ordinals_and_expand_back():
    assert to_runs([5, 1, 2, 3, 9, 2]) == [(1, 3), (5, 5), (9, 9)]
    assert from_runs([(1, 3), (9, 9)]) == {1, 2, 3, 9}
    assert to_runs([]) == []


def test_progress_merge_is_the_union_and_drops_epochs_behind():
    a = StreamProgress(0, {0: frozenset({"a.tar"}), 1: frozenset({"c.tar"})})
    b = StreamProgress(1, {1: frozenset({"b.tar"})})
    merged = a.merge(b)
    assert merged == StreamProgress(1, {1: frozenset({"b.tar", "c.tar"})})
    assert merged.is_complete(0, "zz.tar") and merged.is_complete(1, "b.tar") and not merged.is_complete(1, "a.tar")
    assert b.merge(a) == merged


def test_merge_unites_every_ranks_samples_and_prunes_completed_shards():
    stream = StreamProgress(0, {0: frozenset({"done.tar"})})
    rank0 = DataPosition.of_samples(stream, {(0, "part.tar"): [0, 1, 2], (0, "done.tar"): [7]}, audit=["0:part.tar:0"])
    rank1 = DataPosition.of_samples(stream, {(0, "part.tar"): [3, 10]}, audit=["0:part.tar:3"])
    assert (0, "done.tar") not in rank0.consumed  # a complete shard is not streamed again: nothing to filter
    merged = rank0.merge(rank1)
    assert merged.consumed == {(0, "part.tar"): ((0, 3), (10, 10))}
    assert merged.audit == ("0:part.tar:0", "0:part.tar:3")
    later = merged.merge(DataPosition(StreamProgress(1), {}, ()))
    assert later.consumed == {} and later.stream.epoch == 1  # epoch 0 is over: its partial shards are done


def test_json_round_trip_and_empty_position():
    position = DataPosition.of_samples(StreamProgress(2, {3: frozenset({"x.tar"})}), {(2, "y.tar"): [4, 5, 6, 8]})
    body = json.loads(json.dumps(position.to_json()))
    assert body == {"stream": {"epoch": 2, "completed": {"3": ["x.tar"]}}, "consumed": {"2": {"y.tar": [[4, 6], [8, 8]]}}}
    assert DataPosition.from_json(body) == position
    assert DataPosition.from_json(None) == DataPosition() and DataPosition().audit is None
    audited = DataPosition(StreamProgress(), {}, ("0:a.tar:1",))
    assert DataPosition.from_json(json.loads(json.dumps(audited.to_json()))).audit == ("0:a.tar:1",)
