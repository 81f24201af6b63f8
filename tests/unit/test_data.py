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
    StreamProgress,
    decode_image,
    fetch_shard,
    parse_shard,
    plan_epochs,
    shard_order,
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


def test_garbage_is_a_truncated_shard_with_no_samples():
    parse = parse_shard(b"\x00garbage" * 100)
    assert parse.samples == [] and parse.truncated


def test_fetch_shard_retries_then_gives_up(tmp_path):
    data, failed, error = fetch_shard(storage.resolve(str(tmp_path / "none.tar")), retries=2, backoff_s=0.0)
    assert data is None and failed == 3 and "none.tar" in error


def test_shard_order_is_a_seeded_permutation_per_epoch():
    assert sorted(shard_order(10, 0, 0)) == list(range(10))
    assert shard_order(10, 0, 0) == shard_order(10, 0, 0)
    assert shard_order(10, 0, 0) != shard_order(10, 0, 1)


def test_plan_resumes_at_position_without_the_completed_shards():
    names = [f"{i:05d}.tar" for i in range(4)]
    plan = plan_epochs(names, seed=3, epochs=3, position=StreamProgress(1, {1: frozenset({"00002.tar"})}))
    assert [r["epoch"] for r in plan] == [1, 1, 1, 2, 2, 2, 2]
    assert 2 not in [r["shard_index"] for r in plan if r["epoch"] == 1]
    with pytest.raises(ValueError, match="not in the manifest"):
        plan_epochs(names, 0, 1, StreamProgress(0, {0: frozenset({"zz.tar"})}))


def _report(yielded, lost=0, truncated=False, skipped=False, errors=None):
    return {"yielded": yielded, "errors": errors or {}, "truncated": truncated, "skipped": skipped,
            "failed_attempts": 4 if skipped else 0, "error": "gone" if skipped else None, "lost": lost}


def test_monitor_marks_shards_complete_and_reports_position():
    monitor = DataStreamMonitor(["a.tar", "b.tar"], samples_per_epoch=20, max_error_fraction=0.5)
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
    monitor = DataStreamMonitor(["a.tar", "b.tar"], samples_per_epoch=100, max_error_fraction=0.05)
    monitor.record_read(0, 0, _report(47, lost=3, truncated=True))
    assert monitor.record_consumed({(0, 0): 47}) is None
    monitor.record_read(1, 1, _report(47, errors={"bad_json": 3}))
    assert monitor.get_failure() is None  # budgets are per epoch
    monitor.record_read(0, 1, _report(47, errors={"missing_caption": 3}))
    failure = monitor.get_failure()
    assert "epoch 0" in failure and "a.tar: epoch 0: 3 samples_lost_to_truncation" in failure
    assert "b.tar" in failure and "6 bad or lost samples" in failure


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
