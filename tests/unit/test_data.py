"""The stream's pure parts without Ray: tar parsing under damage, plans, the monitor's bookkeeping, config."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from orchestrator import storage
from orchestrator.data import (
    DataConfig,
    DataStreamMonitor,
    DecodeAugmentTokenize,
    ReadAhead,
    StreamProgress,
    ShardRead,
    ShardRef,
    SourceShards,
    VisitTable,
    data_health_line,
    decode_image,
    parse_shard,
    plan_epochs,
    read_ahead_bound,
    shard_order,
    stream_shard,
)


def _jpeg(value=100, size=(16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _tar(samples: list[dict[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for index, members in enumerate(samples):
            for extension, payload in members.items():
                info = tarfile.TarInfo(f"{index:04d}.{extension}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _good(i: int) -> dict[str, bytes]:
    return {"jpg": _jpeg(i), "txt": f"caption {i}".encode(), "json": json.dumps({"i": i}).encode()}


def test_parse_shard_drops_only_the_bad_samples():
    samples = [_good(0), {"jpg": _jpeg(), "json": b"{}"}, {"jpg": _jpeg(), "txt": b"x", "json": b"{oops"},
               {"txt": b"no image"}, _good(4)]
    parse = parse_shard(_tar(samples))
    assert [s.ordinal for s in parse.samples] == [0, 4]
    assert parse.samples[1].caption == "caption 4" and parse.samples[1].meta == {"i": 4}
    assert dict(parse.errors) == {"missing_caption": 1, "bad_json": 1, "missing_image": 1}
    assert not parse.truncated


def test_truncated_tar_keeps_the_samples_before_the_damage():
    data = _tar([_good(i) for i in range(6)])
    cut = data.index(b"caption 3") - 600  # inside sample 3's image payload
    parse = parse_shard(data[:cut])
    assert parse.truncated and [s.ordinal for s in parse.samples] == [0, 1, 2]


class _ShortReads:
    """A file system whose streams give at most 700 bytes a read (as a socket may), counting its opens."""

    def __init__(self):
        self.opens = 0

    def open_input_stream(self, path):
        self.opens += 1
        data = open(path, "rb").read()

        class Trickle(io.BytesIO):
            def read(self, size=-1):
                return super().read(700 if size < 0 else min(size, 700))

        return Trickle(data)


@pytest.fixture(params=["file", "short reads"])
def read_tar(request, tmp_path):
    """``read_tar(data, expected)``: a tar streamed from a real file as the read stage streams it, in blocks of 2;
    returns the kept ordinals, the :class:`ShardRead` and the monitor's report against ``expected`` samples."""
    def read(data: bytes, expected: int):
        path = tmp_path / "shard.tar"
        path.write_bytes(data)
        location = storage.resolve(str(path))
        if request.param == "short reads":
            location = storage.Location(_ShortReads(), str(path), str(path))
        shard = ShardRead()
        blocks = list(stream_shard(location, shard, block_samples=2))
        return [sample.ordinal for block in blocks for sample in block], shard, shard.report(expected)

    return read


def _header_offset(data: bytes, name: str) -> int:
    return tarfile.open(fileobj=io.BytesIO(data)).getmember(name).offset


def test_a_clean_tar_reads_whole_with_or_without_record_padding(read_tar):
    data = _tar([_good(i) for i in range(6)])
    last = tarfile.open(fileobj=io.BytesIO(data)).getmember("0005.json")
    marker = last.offset_data + -(-last.size // 512) * 512  # the end-of-archive marker right after the last member
    for tar in (data, data[:marker + 512]):  # tarfile's padded records; a writer that ends after one zero block
        ordinals, read, report = read_tar(tar, expected=6)
        assert ordinals == list(range(6)) and (read.truncated, read.skipped, read.error) == (False, False, None)
        assert (report["lost"], report["count_gap"]) == (0, 0)
    assert read_tar(_tar([]), expected=0)[1] == ShardRead()  # a tar of no samples is a clean, empty shard


def test_a_tar_cut_at_a_member_boundary_is_truncation_not_a_shorter_tar(read_tar):
    data = _tar([_good(i) for i in range(6)])
    cut = _header_offset(data, "0004.jpg")  # where sample 4 would begin: tarfile alone sees a clean end
    ordinals, read, report = read_tar(data[:cut], expected=6)
    assert ordinals == [0, 1, 2, 3] and read.truncated and not read.skipped and dict(read.errors) == {}
    assert read.error == f"cut short at byte {cut}: the file ends after a member, with no end-of-archive marker"
    assert (report["lost"], report["count_gap"]) == (2, 0)
    assert parse_shard(data[:cut]).truncated and parse_shard(data[:cut]).problem == read.error


def test_the_sample_being_read_at_a_cut_is_kept_whole_or_counted_lost(read_tar):
    data = _tar([_good(i) for i in range(6)])  # members in order KEY.jpg, KEY.txt, KEY.json
    ordinals, read, report = read_tar(data[:_header_offset(data, "0004.txt")], expected=6)
    assert ordinals == [0, 1, 2, 3] and dict(read.errors) == {} and report["lost"] == 2  # lost, not "no caption"
    ordinals, read, report = read_tar(data[:_header_offset(data, "0004.json")], expected=6)
    assert ordinals == [0, 1, 2, 3, 4] and read.truncated and report["lost"] == 1  # image + caption: a sample


def test_a_tar_cut_inside_a_header_or_followed_by_garbage_is_truncation(read_tar):
    data = _tar([_good(i) for i in range(6)])
    boundary = _header_offset(data, "0004.jpg")
    ordinals, read, report = read_tar(data[:boundary + 100], expected=6)
    assert ordinals == [0, 1, 2, 3] and read.truncated and report["lost"] == 2
    assert read.error == f"cut short at byte {boundary}: the file ends inside a header"
    ordinals, read, report = read_tar(data[:boundary] + b"\x01" * 1024, expected=6)
    assert ordinals == [0, 1, 2, 3] and read.truncated and report["lost"] == 2
    assert read.error == (f"cut short at byte {boundary}: an invalid header where a member or the end-of-archive "
                          f"marker should begin")


def test_a_tar_cut_inside_a_members_data_names_the_member(read_tar):
    data = _tar([_good(i) for i in range(6)])
    cut = data.index(b"caption 3") - 600  # inside sample 3's image payload
    ordinals, read, report = read_tar(data[:cut], expected=6)
    assert ordinals == [0, 1, 2] and read.truncated and report["lost"] == 3
    assert read.error == f"cut short at byte {cut}, in 0003.jpg: unexpected end of data"


@pytest.mark.parametrize("data, reason", [(np.random.default_rng(0).bytes(30_000), "not a tar archive: "),
                                          (b"", "not a tar archive: empty file")], ids=["random bytes", "empty file"])
def test_a_file_that_is_no_tar_is_an_unreadable_shard_skipped_at_once(tmp_path, data, reason):
    path = tmp_path / "shard.tar"
    path.write_bytes(data)
    fs, read = _ShortReads(), ShardRead()
    blocks = list(stream_shard(storage.Location(fs, str(path), str(path)), read, block_samples=2, retries=3))
    assert blocks == [] and fs.opens == 1 and read.skipped and not read.truncated  # deterministic: not retried
    assert read.error.startswith(reason) and read.failed_attempts == 1
    report = read.report(2000)
    assert (report["skipped"], report["lost"], report["count_gap"]) == (True, 2000, 0)
    parse = parse_shard(data)
    assert parse.unreadable and not parse.truncated and parse.problem == read.error


def test_stream_shard_retries_then_gives_up(tmp_path):
    read = ShardRead()
    blocks = list(stream_shard(storage.resolve(str(tmp_path / "none.tar")), read, block_samples=4, retries=2))
    assert blocks == [] and read.failed_attempts == 3 and read.skipped and "none.tar" in read.error


class _FailingOnce:
    """A file system whose stream of one file breaks after ``cut`` bytes on the first open only."""

    def __init__(self, path, cut):
        self.path, self.cut, self.opens = path, cut, 0

    def open_input_stream(self, path):
        self.opens += 1
        data = open(self.path, "rb").read()
        if self.opens > 1:
            return io.BytesIO(data)
        outer = self

        class Broken(io.BytesIO):
            def read(self, size=-1):
                if self.tell() >= outer.cut:
                    raise OSError("connection reset by peer")
                return super().read(size if size >= 0 else outer.cut - self.tell())

        return Broken(data)


def test_a_retry_resumes_after_the_blocks_already_passed_on(tmp_path):
    samples = [_good(i) for i in range(10)]
    samples[7] = {"jpg": _jpeg(), "json": b"{}"}  # one bad sample after the break: counted once
    samples[1] = {"txt": b"no image"}  # one bad sample before the break: counted once
    path = tmp_path / "s.tar"
    path.write_bytes(_tar(samples))
    fs = _FailingOnce(path, cut=_tar(samples).index(b"caption 6") - 300)  # inside sample 6
    location = storage.Location(fs, str(path), str(path))
    read = ShardRead()
    blocks = list(stream_shard(location, read, block_samples=2, retries=1, backoff_s=0.0))
    ordinals = [s.ordinal for block in blocks for s in block]
    assert ordinals == [0, 2, 3, 4, 5, 6, 8, 9] and fs.opens == 2
    assert read.yielded == 8 and dict(read.errors) == {"missing_image": 1, "missing_caption": 1}
    assert read.failed_attempts == 1 and not read.skipped and not read.truncated
    assert max(len(block) for block in blocks) == 2


def test_keys_follow_the_first_dot_of_the_basename_and_captions_can_come_from_json():
    buffer = io.BytesIO()
    members = [("dir.v2/a.jpg", _jpeg()), ("dir.v2/a.txt", b"from txt"), ("dir.v2/a.json", b'{"meta": {"alt": "nested"}}'),
               ("dir.v2/b.JPEG", _jpeg()), ("dir.v2/b.seg.png", _jpeg()), ("dir.v2/b.json", b'{"caption": "top"}')]
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    parse = parse_shard(buffer.getvalue())
    assert [s.key for s in parse.samples] == ["dir.v2/a"] and dict(parse.errors) == {"missing_caption": 1}
    nested = parse_shard(buffer.getvalue(), caption_key="meta.alt")
    assert [(s.key, s.caption) for s in nested.samples] == [("dir.v2/a", "nested")]
    top = parse_shard(buffer.getvalue(), caption_key="caption")
    assert [(s.key, s.caption) for s in top.samples] == [("dir.v2/b", "top")]  # .JPEG is the image, not .seg.png


def test_shard_order_is_a_seeded_permutation_per_epoch():
    assert sorted(shard_order(10, 0, 0)) == list(range(10))
    assert shard_order(10, 0, 0) == shard_order(10, 0, 0)
    assert shard_order(10, 0, 0) != shard_order(10, 0, 1)


def _source(name, counts, weight=1.0):
    shards = tuple(ShardRef(f"/d/{name}/{i:05d}.tar", f"{i:05d}.tar", n) for i, n in enumerate(counts))
    return SourceShards(name, weight, shards, {"manifest.json": len(counts)})


def _table(*sources):
    return VisitTable.of_sources(list(sources))


def test_plan_resumes_at_position_without_the_completed_shards():
    table = _table(_source("a", [5] * 4))
    plan = plan_epochs(table, seed=3, epochs=3, position=StreamProgress(1, {1: frozenset({"00002.tar"})}))
    assert [r["epoch"] for r in plan] == [1, 1, 1, 2, 2, 2, 2]
    assert 2 not in [r["visit"] for r in plan if r["epoch"] == 1]
    assert [r["visit"] for r in plan if r["epoch"] == 2] == shard_order(4, 3, 2)  # one source: a shard permutation
    assert plan[0]["url"] == f"/d/a/{table.visits[plan[0]['visit']].name}" and plan[0]["samples"] == 5
    with pytest.raises(ValueError, match="not in this shard set"):
        plan_epochs(table, 0, 1, StreamProgress(0, {0: frozenset({"zz.tar"})}))


def test_weights_visit_shards_whole_times_plus_a_seeded_fraction_per_epoch():
    table = _table(_source("laion", [10] * 4, weight=1.5), _source("cc", [10] * 6, weight=2.0), _source("tiny", [10] * 10, weight=0.3))
    assert table.samples_per_epoch == round(1.5 * 40 + 2 * 60 + 0.3 * 100)
    names = {v.name for v in table.visits}
    assert "laion/00000.tar" in names and "laion/00000.tar#1" in names and "cc/00005.tar#1" in names
    for epoch in range(3):
        visits = [table.visits[i] for i in table.epoch_visits(seed=0, epoch=epoch)]
        per_source = {s: [v for v in visits if v.source == s] for s in range(3)}
        assert len(per_source[0]) == 4 + 2 and len(per_source[1]) == 12 and len(per_source[2]) == 3
        assert len({v.name for v in visits}) == len(visits)
    subsets = [frozenset(table.visits[i].shard for i in table.epoch_visits(0, e) if table.visits[i].source == 2)
               for e in range(5)]
    assert len(set(subsets)) > 1  # a different fraction each epoch
    assert table.epoch_visits(0, 1) == table.epoch_visits(0, 1) != table.epoch_visits(1, 1)


def _report(yielded, lost=0, truncated=False, skipped=False, errors=None, gap=0):
    return {"yielded": yielded, "errors": errors or {}, "truncated": truncated, "skipped": skipped,
            "failed_attempts": 4 if skipped else 0, "error": "gone" if skipped else None, "lost": lost,
            "count_gap": gap}


def test_monitor_marks_shards_complete_and_reports_position():
    monitor = DataStreamMonitor(_table(_source("a", [10, 10])), seed=0, max_error_fraction=0.5)
    monitor.record_read(0, 0, _report(10))
    monitor.record_decode_errors({(0, 0): 1})
    monitor.record_consumed({(0, 0): 8})
    assert monitor.get_position() == StreamProgress(epoch=0)
    monitor.record_consumed({(0, 0): 1})
    monitor.record_read(0, 1, _report(0, lost=10, skipped=True))
    assert monitor.get_position() == StreamProgress(epoch=1)
    assert monitor.get_counters()["decode_error"] == 1 and monitor.get_counters()["skipped_shards"] == 1
    assert monitor.get_counters()["read_retries"] == 3


def test_monitor_fails_past_the_error_budget_naming_the_shard():
    monitor = DataStreamMonitor(_table(_source("a", [50, 50])), seed=0, max_error_fraction=0.05)
    monitor.record_read(0, 0, _report(47, lost=3, truncated=True))
    assert monitor.record_consumed({(0, 0): 47}) is None
    monitor.record_read(1, 1, _report(47, errors={"bad_json": 3}))
    assert monitor.get_failure() is None  # budgets are per epoch
    monitor.record_read(0, 1, _report(47, errors={"missing_caption": 3}))
    failure = monitor.get_failure()
    assert "epoch 0" in failure and "00000.tar: epoch 0: 3 samples_lost_to_truncation" in failure
    assert "00001.tar" in failure and "6 bad or lost samples" in failure


def test_monitor_charges_a_cut_tar_and_skips_an_unreadable_one_naming_both(tmp_path):
    data = _tar([_good(i) for i in range(8)])
    (tmp_path / "00000.tar").write_bytes(data[:_header_offset(data, "0004.jpg")])  # cut in half
    (tmp_path / "00001.tar").write_bytes(np.random.default_rng(1).bytes(len(data)))
    monitor = DataStreamMonitor(_table(_source("a", [8, 8])), seed=0, max_error_fraction=0.5)
    for shard in (0, 1):
        read = ShardRead()
        for _ in stream_shard(storage.resolve(str(tmp_path / f"{shard:05d}.tar")), read, block_samples=4, retries=2):
            pass
        monitor.record_read(0, shard, read.report(8))
    counters = monitor.get_counters()
    assert (counters["truncated_shards"], counters["samples_lost_to_truncation"]) == (1, 4)
    assert (counters["skipped_shards"], counters["samples_in_skipped_shards"], counters["read_retries"]) == (1, 8, 0)
    assert counters["count_mismatch_shards"] == 0
    problems = monitor.get_problem_shards()
    assert problems["00000.tar"] == ["epoch 0: 4 samples_lost_to_truncation (cut short at byte "
                                     f"{_header_offset(data, '0004.jpg')}: the file ends after a member, with no "
                                     "end-of-archive marker)"]
    assert problems["00001.tar"][0].startswith("epoch 0: 8 samples_in_skipped_shards (not a tar archive: ")
    failure = monitor.get_failure()  # 4 lost: within 0.5 of 16; 4 + 8 lost: over
    assert "12 bad or lost samples" in failure and "not a tar archive" in failure and "cut short" in failure


def test_monitor_names_a_cut_tar_that_lost_nothing():
    monitor = DataStreamMonitor(_table(_source("a", [10])), seed=0, max_error_fraction=0.0)
    read = ShardRead(yielded=10, truncated=True, error="cut short at byte 9216: the file ends after a member")
    monitor.record_read(0, 0, read.report(10))
    assert monitor.get_counters()["truncated_shards"] == 1 and monitor.get_failure() is None
    assert monitor.get_problem_shards()["00000.tar"] == [
        "epoch 0: 0 samples_lost_to_truncation (cut short at byte 9216: the file ends after a member)"]


def test_data_health_line_names_each_kind_with_counts_and_units():
    monitor = DataStreamMonitor(_table(_source("a", [10])), seed=0, max_error_fraction=1.0)
    monitor.record_read(0, 0, _report(10))
    assert data_health_line(monitor.get_counters()) is None  # clean data: nothing to say
    counters = {**monitor.get_counters(), "decode_error": 12, "missing_caption": 2, "truncated_shards": 1,
                "samples_lost_to_truncation": 250, "skipped_shards": 1, "samples_in_skipped_shards": 2000,
                "count_mismatch_shards": 1, "samples_short_of_count": 12, "read_retries": 3}
    line = ("data: 14 bad samples skipped (12 undecodable images, 2 without caption); 250 samples lost to shards "
            "cut short (1 read); 2,000 samples in unreadable shards (1 read); 1 shard read off the listed count "
            "(-12 samples)")
    assert data_health_line(counters) == line
    assert data_health_line({f"data/{name}": float(n) for name, n in counters.items()}) == line  # MLflow's names
    assert data_health_line({"bad_json": 1, "count_mismatch_shards": 2, "samples_beyond_count": 3,
                             "samples_short_of_count": 1}) == (
        "data: 1 bad sample skipped (1 with unreadable JSON); 2 shard reads off the listed count (+3, -1 samples)")


def test_monitor_reports_count_mismatches_without_charging_the_budget():
    monitor = DataStreamMonitor(_table(_source("a", [10, 10])), seed=0, max_error_fraction=0.0)
    monitor.record_read(0, 0, _report(12, gap=2))
    monitor.record_read(0, 1, _report(7, gap=-3))
    counters = monitor.get_counters()
    assert (counters["count_mismatch_shards"], counters["samples_beyond_count"], counters["samples_short_of_count"]) == (2, 2, 3)
    assert monitor.get_failure() is None and "-3 samples" in monitor.get_problem_shards()["00001.tar"][0]
    monitor.record_consumed({(0, 0): 12, (0, 1): 7})
    assert monitor.get_position().epoch == 1  # completion follows what was read, not the listed count


def test_monitor_bounds_the_read_ahead_and_counts_per_source():
    monitor = DataStreamMonitor(_table(_source("a", [10]), _source("b", [10])), seed=0, max_error_fraction=1.0,
                                read_ahead=ReadAhead(floor=8))
    assert monitor.has_room()
    monitor.record_block(0, 6)
    monitor.record_block(1, 4)
    assert not monitor.has_room()  # 10 samples in flight >= window 8
    monitor.record_consumed({(0, 0): 3})
    assert monitor.has_room()
    counters = monitor.get_counters()
    assert counters["source/a/samples_read"] == 6 and counters["source/b/samples_read"] == 4
    assert counters["source/a/samples_consumed"] == 3 and "source/b/samples_consumed" not in counters
    unbounded = DataStreamMonitor(_table(_source("a", [10])), seed=0, max_error_fraction=1.0)
    unbounded.record_block(0, 10_000)
    assert unbounded.has_room() and "source/a/samples_read" not in unbounded.get_counters()  # one source: no split


def test_read_ahead_window_grows_with_the_consumption_rate():
    bound = ReadAhead(floor=100, seconds=10)
    assert bound.window(0.0) == 100 and bound.window(50.0) == 600
    assert ReadAhead(floor=100, fixed=40).window(50.0) == 100 and ReadAhead(floor=100, fixed=400).window(0) == 400
    cfg = DataConfig(batch_size=8, shuffle_buffer=16, decode_concurrency=2, decode_batch_size=4, read_block_samples=5)
    assert read_ahead_bound(cfg, consumers=2).floor == 2 * (16 + 24) + 3 * 4 + 10
    assert read_ahead_bound(cfg.model_copy(update={"read_ahead_batches": "unbounded"}), 2).window(1e6) is None
    assert read_ahead_bound(cfg.model_copy(update={"read_ahead_batches": 100}), 2).fixed == 2 * 100 * 8


def test_decode_stage_drops_corrupt_images_and_tokenizes():
    stage = DecodeAugmentTokenize(image_size=8, image_dtype="uint8", context_length=77, monitor_name=None)
    batch = {"image": np.array([_jpeg(), b"\xff\xd8broken", _jpeg(50)], dtype=object),
             "caption": np.array(["a dog", "x", "a diagram"], dtype=object),
             "epoch": np.zeros(3, np.int32), "shard_index": np.zeros(3, np.int32),
             "sample_id": np.arange(3, dtype=np.int64)}
    out = stage(batch)
    assert out["image"].shape == (2, 8, 8, 3) and out["image"].dtype == np.uint8  # channels-last
    assert out["sample_id"].tolist() == [0, 2]
    assert out["text"][1, :4].tolist() == [49406, 320, 22697, 49407]


def test_decode_image_returns_rgb_chw_uint8_even_for_gray_png():
    assert tuple(decode_image(_jpeg(size=(20, 10))).shape) == (3, 10, 20)
    buffer = io.BytesIO()
    Image.new("L", (5, 4), 7).save(buffer, format="PNG")
    gray = decode_image(buffer.getvalue())
    assert tuple(gray.shape) == (3, 4, 5) and gray.dtype.is_floating_point is False and int(gray.max()) == 7


def test_data_config_validates_and_resolves_relative_paths():
    with pytest.raises(ValidationError, match="max_error_fraction"):
        DataConfig(max_error_fraction=2.0)
    with pytest.raises(ValidationError, match="shard_s"):
        DataConfig(shard_s="typo")
    cfg = DataConfig(shards="data/x").resolved("/base")
    assert cfg.shards == "/base/data/x" and cfg.heldout_url == "/base/data/x/heldout"
    assert DataConfig(shards="s3://b/p").resolved("/base").shards == "s3://b/p"
    listed = DataConfig(shards=["a/{0..1}.tar", "s3://b/c"], manifest="m.json").resolved("/base")
    assert listed.shards == ["/base/a/{0..1}.tar", "s3://b/c"] and listed.manifest == "/base/m.json"
    assert listed.heldout_url is None  # a list names no single folder to hold the held-out split


def test_weighted_sources_are_validated_naming_the_field():
    cfg = DataConfig(sources=[{"shards": "s3://b/laion400m/{00000..00009}.tar", "weight": 2},
                              {"shards": "cc12m", "manifest": "idx/m.json"}]).resolved("/base")
    assert [(s.display_name, s.weight) for s in cfg.source_list()] == [("laion400m", 2.0), ("cc12m", 1.0)]
    assert cfg.sources[1].shards == "/base/cc12m" and cfg.sources[1].manifest == "/base/idx/m.json"
    with pytest.raises(ValidationError, match="not both"):
        DataConfig(shards="x", sources=[{"shards": "y"}])
    with pytest.raises(ValidationError, match="distinct names"):
        DataConfig(sources=[{"shards": "a/x"}, {"shards": "b/x"}])
    with pytest.raises(ValidationError, match="weight"):
        DataConfig(sources=[{"shards": "a", "weight": 0}])
    with pytest.raises(ValidationError, match="read_ahead_batches"):
        DataConfig(read_ahead_batches=0)
    assert DataConfig(shards="one").source_list()[0].shards == "one"


def test_storage_rejects_unknown_schemes_and_bad_endpoints():
    with pytest.raises(ValueError, match="gs://b"):
        storage.resolve("gs://b/x")
    with pytest.raises(ValueError, match="s3_endpoint_url"):
        storage.resolve("s3://b/x", "127.0.0.1:9000")


def test_decode_stage_can_emit_normalised_float_images():
    stage = DecodeAugmentTokenize(image_size=8, image_dtype="float32", context_length=77, monitor_name=None,
                                  train=False)
    batch = {"image": np.array([_jpeg(255)], dtype=object), "caption": np.array(["a dog"], dtype=object),
             "epoch": np.zeros(1, np.int32), "shard_index": np.zeros(1, np.int32), "sample_id": np.zeros(1, np.int64)}
    image = stage(batch)["image"]
    assert image.dtype == np.float32 and image.shape == (1, 8, 8, 3)
    assert np.allclose(image[0, :, :, 0], (1.0 - 0.48145466) / 0.26862954, atol=0.05)  # white -> CLIP-normalised


def _textured_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((96, 80), Image.BILINEAR).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_a_samples_random_crop_depends_on_seed_epoch_and_id_only():
    def run(order, epoch=0, seed=0):
        stage = DecodeAugmentTokenize(image_size=32, image_dtype="uint8", context_length=77, monitor_name=None,
                                      seed=seed)
        batch = {"image": np.array([images[i] for i in order], dtype=object),
                 "caption": np.array(["a photo"] * len(order), dtype=object),
                 "epoch": np.full(len(order), epoch, np.int32), "shard_index": np.zeros(len(order), np.int32),
                 "sample_id": np.array([100 + i for i in order], dtype=np.int64)}
        out = stage(batch)
        return {int(i): out["image"][row] for row, i in enumerate(out["sample_id"] - 100)}

    images = [_textured_jpeg(seed) for seed in range(3)]
    first = run([0, 1, 2])
    regrouped = run([2, 0])  # another batch, another actor: the same crops
    assert np.array_equal(first[0], regrouped[0]) and np.array_equal(first[2], regrouped[2])
    assert not np.array_equal(first[0], run([0], epoch=1)[0])  # a new epoch, a new crop
    assert not np.array_equal(first[0], run([0], seed=1)[0])
