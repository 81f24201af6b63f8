"""Shard writing without Ray: sources, resize/re-encode, tar + parquet layout, manifest validation, resume."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from orchestrator import storage
from orchestrator.data import (
    Manifest,
    ManifestError,
    ShardEntry,
    ShardOptions,
    SourceRecord,
    build_shard,
    captioned_folder_records,
    fashion_mnist_records,
    parse_manifest,
    read_idx,
    resize_to_max_side,
    table_records,
    write_manifest,
    write_shard,
)


def _png(path, size=(40, 20), mode="RGB"):
    Image.new(mode, size, (200, 10, 10) if mode == "RGB" else (0, 0, 0, 0)).save(path)


def test_captioned_folder_uses_first_line_and_flags_missing_captions(tmp_path):
    (tmp_path / "a").mkdir()
    _png(tmp_path / "a" / "cat.png")
    (tmp_path / "a" / "cat.txt").write_text("A cat.\nfr.utf8=Un chat.\n")
    _png(tmp_path / "dog.png")
    records = captioned_folder_records(str(tmp_path))
    assert [(r.source, r.caption) for r in records] == [("a/cat.png", "A cat."), ("dog.png", None)]


def test_captioned_folder_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        captioned_folder_records(str(tmp_path / "nowhere"))


def test_table_records_resolve_relative_paths_and_name_bad_columns(tmp_path):
    _png(tmp_path / "x.png")
    (tmp_path / "t.csv").write_text("path,text,label\nx.png,a red box,3\n")
    records = table_records(str(tmp_path / "t.csv"), image_column="path", caption_column="text")
    assert records[0].image == str(tmp_path / "x.png") and records[0].caption == "a red box"
    assert records[0].meta == {"label": 3}
    with pytest.raises(ValueError, match="caption_column='caption'.*columns"):
        table_records(str(tmp_path / "t.csv"), image_column="path")


def test_read_idx_parses_header_and_shape(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    values = np.arange(2 * 3 * 4, dtype=np.uint8)
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(">IIII", 0x0803, 2, 3, 4) + values.tobytes())
    assert np.array_equal(read_idx(str(path)), values.reshape(2, 3, 4))


def test_fashion_mnist_captions_come_from_templates():
    records = fashion_mnist_records("test", templates=["a photo of a {}."])
    assert len(records) == 10_000 and records[0].image.shape == (28, 28)
    assert records[0].caption == "a photo of a ankle boot." and records[0].meta == {"label": 9}
    with pytest.raises(ValueError, match="split must be"):
        fashion_mnist_records("validation")


def test_resize_caps_longest_side_keeps_aspect_never_upscales():
    assert resize_to_max_side(Image.new("RGB", (1000, 500)), 256).size == (256, 128)
    assert resize_to_max_side(Image.new("RGB", (30, 20)), 256).size == (30, 20)


def test_build_shard_writes_img2dataset_layout_and_counts_failures(tmp_path):
    _png(tmp_path / "ok.png", size=(600, 300))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    records = [SourceRecord(str(tmp_path / "ok.png"), "a red box", "ok"),
               SourceRecord(str(tmp_path / "bad.png"), "broken", "bad"),
               SourceRecord(np.zeros((28, 28), np.uint8), None, "nocaption"),
               SourceRecord(np.full((28, 28), 9, np.uint8), "gray", "arr", {"label": 4})]
    tar_bytes, parquet_bytes, failures = build_shard(7, records, ShardOptions(max_side=64))
    names = tarfile.open(fileobj=io.BytesIO(tar_bytes)).getnames()
    assert names == ["000070000.jpg", "000070000.txt", "000070000.json",
                     "000070003.jpg", "000070003.txt", "000070003.json"]
    assert [f["source"] for f in failures] == ["bad", "nocaption"]
    table = pq.read_table(io.BytesIO(parquet_bytes)).to_pylist()
    assert [row["status"] for row in table] == ["success", "failed_to_read", "failed_to_read", "success"]
    assert (table[0]["width"], table[0]["height"], table[0]["original_width"]) == (64, 32, 600)
    member = tarfile.open(fileobj=io.BytesIO(tar_bytes)).extractfile("000070003.json")
    assert json.loads(member.read())["label"] == 4


def test_write_shard_keeps_complete_shards_and_redoes_changed_ones(tmp_path):
    records = [SourceRecord(np.zeros((8, 8), np.uint8), f"c{i}", f"s{i}") for i in range(3)]
    first = write_shard(str(tmp_path), None, 0, records, ShardOptions())
    again = write_shard(str(tmp_path), None, 0, records, ShardOptions())
    changed = write_shard(str(tmp_path), None, 0, records[:2], ShardOptions())
    assert (first.kept, again.kept, changed.kept) == (False, True, False)
    assert (again.samples, changed.samples) == (3, 2)


def test_manifest_round_trip_and_validation_names_the_field(tmp_path):
    location = storage.resolve(str(tmp_path / "manifest.json"))
    write_manifest(location, Manifest([ShardEntry("00000.tar", 5, 1)], extra={"k": 1}))
    manifest = parse_manifest(storage.read_bytes(location), "m")
    assert manifest.total_samples == 5 and manifest.total_failed == 1 and manifest.extra == {"k": 1}
    body = json.loads(storage.read_bytes(location))
    body["shards"][0]["samples"] = -1
    with pytest.raises(ManifestError, match=r"shards\[0\].samples"):
        parse_manifest(json.dumps(body).encode(), "m")
    body["shards"][0]["samples"], body["total_samples"] = 5, 6
    with pytest.raises(ManifestError, match="total_samples=6"):
        parse_manifest(json.dumps(body).encode(), "m")
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest(b"{", "m")


def test_shard_options_reject_bad_values():
    with pytest.raises(ValueError, match="image_format"):
        ShardOptions(image_format="gif")
    with pytest.raises(ValueError, match="max_side"):
        ShardOptions(max_side=0)
