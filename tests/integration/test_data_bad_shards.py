"""Planted damage on a real S3 endpoint: each kind of bad data is dropped and counted exactly, the error budget
stops the stream naming the shards, and missing buckets/prefixes/manifests fail before any work.

Seven shards of 12 Fashion-MNIST images are written locally, damaged, then uploaded with boto3:
00000 one corrupt JPEG · 00001 truncated inside sample 5 · 00002 one caption removed and one JSON broken ·
00003 listed in the manifest but never uploaded · 00004 intact · 00005 cut in half at a member boundary (a
partial upload: tarfile alone sees a shorter, clean tar) · 00006 random bytes.
"""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from pathlib import Path

import boto3
import pytest
import ray

from jobs.prepare_data import main as prepare_main
from orchestrator.data import (
    DataConfig,
    DataErrorBudgetExceeded,
    build_train_dataset,
    iter_train_batches,
    open_shard_set,
    stream_counters,
)
from orchestrator.data import ManifestError, ShardOptions, data_health_line, fashion_mnist_records, prepare_shards
from orchestrator.data.monitor import get_monitor
from orchestrator.storage import StorageError

pytestmark = pytest.mark.integration

BUCKET = "rayclip-damaged"
SHARD = 12


def _rewrite(data: bytes, change) -> bytes:
    """Copy a tar, passing each member through ``change(name, payload)`` (None drops the member)."""
    source, target = tarfile.open(fileobj=io.BytesIO(data)), io.BytesIO()
    with tarfile.open(fileobj=target, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for member in source.getmembers():
            payload = change(member.name, source.extractfile(member).read())
            if payload is not None:
                info = tarfile.TarInfo(member.name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return target.getvalue()


def _truncate_inside(data: bytes, name: str) -> bytes:
    member = tarfile.open(fileobj=io.BytesIO(data)).getmember(name)
    return data[: member.offset_data + member.size // 2]


def _cut_before(data: bytes, name: str) -> bytes:
    return data[: tarfile.open(fileobj=io.BytesIO(data)).getmember(name).offset]


def _damage(folder: Path) -> dict[str, bytes]:
    shards = {path.name: path.read_bytes() for path in sorted(folder.glob("*.tar"))}
    corrupt_jpeg = b"\xff\xd8\xff\xe0garbage"
    shards["00000.tar"] = _rewrite(shards["00000.tar"], lambda n, p: corrupt_jpeg if n == "000000003.jpg" else p)
    shards["00001.tar"] = _truncate_inside(shards["00001.tar"], "000010005.jpg")
    shards["00002.tar"] = _rewrite(shards["00002.tar"], lambda n, p: None if n == "000020004.txt"
                                   else b"{not json" if n == "000020007.json" else p)
    del shards["00003.tar"]
    shards["00005.tar"] = _cut_before(shards["00005.tar"], "000050006.jpg")
    shards["00006.tar"] = random.Random(6).randbytes(len(shards["00006.tar"]))
    return shards


@pytest.fixture(scope="module")
def damaged_url(s3_endpoint, ray_session, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("damaged")
    records = fashion_mnist_records("train")[: 7 * SHARD]
    prepare_shards(records, str(folder), ShardOptions(shard_size=SHARD), workers=2, progress=lambda *a: None)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    for name, data in _damage(folder).items():
        s3.put_object(Bucket=BUCKET, Key=f"bad/{name}", Body=data)
    s3.put_object(Bucket=BUCKET, Key="bad/manifest.json", Body=(folder / "manifest.json").read_bytes())
    return f"s3://{BUCKET}/bad"


def _cfg(url: str, endpoint: str, **overrides) -> DataConfig:
    base = dict(shards=url, s3_endpoint_url=endpoint, image_size=16, batch_size=8, shuffle_buffer=0,
                decode_concurrency=1, decode_batch_size=8, read_retries=1, retry_backoff_s=0.01)
    return DataConfig(**{**base, **overrides})


def test_each_kind_of_damage_drops_only_what_it_must(damaged_url, s3_endpoint):
    cfg = _cfg(damaged_url, s3_endpoint, max_error_fraction=0.5)
    stream = build_train_dataset(cfg, epochs=1)
    seen = [s for b in iter_train_batches(stream.dataset, cfg, stream.monitor_name) for s in b["sample_id"].tolist()]
    expected = {(0 << 32) | i for i in range(SHARD) if i != 3} | {(1 << 32) | i for i in range(5)}
    expected |= {(2 << 32) | i for i in range(SHARD) if i not in (4, 7)} | {(4 << 32) | i for i in range(SHARD)}
    expected |= {(5 << 32) | i for i in range(6)}
    assert sorted(seen) == sorted(expected)
    counters = stream_counters(stream.monitor_name)
    assert {k: counters[k] for k in ("decode_error", "missing_caption", "bad_json", "missing_image")} == {
        "decode_error": 1, "missing_caption": 1, "bad_json": 1, "missing_image": 0}
    assert (counters["truncated_shards"], counters["samples_lost_to_truncation"]) == (2, 7 + 6)
    assert (counters["skipped_shards"], counters["samples_in_skipped_shards"], counters["read_retries"]) == (2, 24, 1)
    assert counters["count_mismatch_shards"] == 0 and counters["samples_consumed"] == len(expected) == 44
    problems = ray.get(get_monitor(stream.monitor_name).get_problem_shards.remote())
    assert re.fullmatch(r"epoch 0: 6 samples_lost_to_truncation \(cut short at byte \d+: the file ends after a "
                        r"member, with no end-of-archive marker\)", *problems["00005.tar"])
    assert problems["00006.tar"][0].startswith("epoch 0: 12 samples_in_skipped_shards (not a tar archive: ")
    assert data_health_line(counters) == ("data: 3 bad samples skipped (1 undecodable image, 1 without caption, "
                                          "1 with unreadable JSON); 13 samples lost to shards cut short (2 reads); "
                                          "24 samples in unreadable shards (2 reads)")


def test_error_budget_stops_the_stream_naming_the_shards(damaged_url, s3_endpoint):
    # 00002's 2 bad samples fit in 0.1 of 36; the 6 that the tar cut in half lost do not, whichever is read first
    cfg = _cfg(f"{damaged_url}/{{00002,00004,00005}}.tar", s3_endpoint, max_error_fraction=0.1)
    stream = build_train_dataset(cfg, epochs=1)
    lost_to_the_cut = r"00005\.tar: epoch 0: 6 samples_lost_to_truncation \(cut short at byte \d+: the file ends after"
    with pytest.raises(DataErrorBudgetExceeded, match=rf"max_error_fraction=0.1 of 36; shards: .*{lost_to_the_cut}"):
        for _ in iter_train_batches(stream.dataset, cfg, stream.monitor_name):
            pass


def test_missing_locations_fail_before_any_work(damaged_url, s3_endpoint, tmp_path):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        open_shard_set("s3://no-such-bucket/x", s3_endpoint)
    with pytest.raises(StorageError, match="holds no files"):
        open_shard_set(f"s3://{BUCKET}/no-such-prefix", s3_endpoint)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.put_object(Bucket=BUCKET, Key="nomanifest/readme.txt", Body=b"x")
    with pytest.raises(ManifestError, match="has no manifest.json"):
        open_shard_set(f"s3://{BUCKET}/nomanifest", s3_endpoint)
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key="bad/manifest.json")["Body"].read())
    s3.put_object(Bucket=BUCKET, Key="nomanifest/manifest.json", Body=json.dumps(manifest).encode())
    with pytest.raises(ManifestError, match="no shard listed"):
        build_train_dataset(_cfg(f"s3://{BUCKET}/nomanifest", s3_endpoint), epochs=1)
    with pytest.raises(StorageError, match="does not exist"):
        open_shard_set(str(tmp_path / "absent"))


def test_prepare_cli_from_a_table_to_s3_counts_unreadable_images(s3_endpoint, ray_session, tmp_path, capsys):
    stamps = sorted(Path("/usr/share/tuxpaint/stamps").rglob("*.png"))[:2]
    rows = [{"path": str(stamps[0]), "text": "first"}, {"path": "missing.png", "text": "gone"},
            {"path": str(stamps[1]), "text": "second"}]
    (tmp_path / "table.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    prepare_main(["--input", str(tmp_path / "table.jsonl"), "--output", f"s3://{BUCKET}/table",
                  "--image-column", "path", "--caption-column", "text", "--max-side", "64",
                  "--s3-endpoint-url", s3_endpoint, "--workers", "1"])
    assert "1 shards, 2 samples, 1 failed" in capsys.readouterr().out
    report = json.loads(boto3.client("s3", endpoint_url=s3_endpoint)
                        .get_object(Bucket=BUCKET, Key="table/prepare_report.json")["Body"].read())
    assert [f["source"].rsplit("#", 1)[1] for f in report["failures"]] == ["1"]
    assert "missing.png" in report["failures"][0]["error"] or "FileNotFound" in report["failures"][0]["error"]
