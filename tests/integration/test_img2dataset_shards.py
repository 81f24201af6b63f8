"""Training on shard sets as people have them: real img2dataset output, local and on a real S3 endpoint.

The shards come from the img2dataset CLI itself (``tests/img2dataset_output.py``: Tux Paint stamps served on
127.0.0.1, downloaded, resized and written in 5 shards with 3 failed entries), so the layout, the keys and
the stats files are img2dataset's, not our reading of them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import boto3
import pytest
import yaml
from mlflow import MlflowClient

from jobs.prepare_data import main as prepare_main
from orchestrator.config import DataSource
from orchestrator.data import (
    SHARD_ID_BITS,
    DataConfig,
    DataPosition,
    ManifestError,
    build_train_dataset,
    iter_train_batches,
    resolve_source,
    stream_counters,
    stream_position,
    stream_visit_names,
)
from tests.img2dataset_output import img2dataset_successes

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
BUCKET = "rayclip-img2dataset"


def _copy(folder: Path, target: Path, *suffixes: str) -> Path:
    target.mkdir(parents=True)
    for path in folder.iterdir():
        if path.name.endswith(suffixes):
            shutil.copy(path, target / path.name)
    return target


def _upload(folder: Path, endpoint: str, prefix: str, *suffixes: str) -> str:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)
    for path in sorted(folder.iterdir()):
        if path.name.endswith(suffixes):
            s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def on_s3(img2dataset_shards, s3_endpoint) -> str:
    """img2dataset's whole output folder (tars, stats, parquet) as it would sit in a bucket."""
    return _upload(img2dataset_shards, s3_endpoint, "laion-style", ".tar", "_stats.json", ".parquet")


def _counts(source) -> dict[str, int]:
    return {shard.name: shard.samples for shard in source.shards}


def test_counts_come_from_stats_then_parquet_then_sizes_json(img2dataset_shards, tmp_path):
    expected = img2dataset_successes(img2dataset_shards)
    assert len(expected) == 5 and sum(expected.values()) == 160  # 160 stamps + 3 broken entries that failed
    stats = resolve_source(DataSource(shards=str(img2dataset_shards)), None)
    assert _counts(stats) == expected and stats.counted_from == {"img2dataset stats": 5}

    parquet_only = _copy(img2dataset_shards, tmp_path / "parquet", ".tar", ".parquet")
    from_parquet = resolve_source(DataSource(shards=str(parquet_only)), None)
    assert _counts(from_parquet) == expected and from_parquet.counted_from == {"img2dataset parquet": 5}

    bare = _copy(img2dataset_shards, tmp_path / "bare", ".tar")
    with pytest.raises(ManifestError, match=r"5 of 5 shards .* python jobs/prepare_data.py --index"):
        resolve_source(DataSource(shards=str(bare)), None)
    (bare / "sizes.json").write_text(json.dumps(expected))
    assert _counts(resolve_source(DataSource(shards=str(bare)), None)) == expected

    braced = resolve_source(DataSource(shards=f"{img2dataset_shards}/{{00001..00003}}.tar"), None)
    assert list(_counts(braced)) == ["00001.tar", "00002.tar", "00003.tar"]
    gaps = resolve_source(DataSource(shards=f"{img2dataset_shards}/{{00000..00009}}.tar"), None)
    assert list(_counts(gaps)) == sorted(expected)  # img2dataset leaves gaps: absent shards are left out


def test_index_counts_shards_on_s3_and_writes_the_manifest_beside_or_elsewhere(img2dataset_shards, s3_endpoint,
                                                                                 ray_session, capsys):
    expected = img2dataset_successes(img2dataset_shards)
    bare = _upload(img2dataset_shards, s3_endpoint, "tars-only", ".tar")
    with pytest.raises(ManifestError, match="--index"):
        resolve_source(DataSource(shards=bare), s3_endpoint)

    prepare_main(["--index", f"{bare}/{{00000..00004}}.tar", "--s3-endpoint-url", s3_endpoint, "--workers", "2",
                  "--output", f"s3://{BUCKET}/indexes/laion.json"])
    assert f"s3://{BUCKET}/indexes/laion.json: 5 shards, {sum(expected.values())} samples, 0 failed" in capsys.readouterr().out
    elsewhere = resolve_source(DataSource(shards=bare, manifest=f"s3://{BUCKET}/indexes/laion.json"), s3_endpoint)
    assert _counts(elsewhere) == expected and elsewhere.counted_from == {"manifest.json": 5}

    prepare_main(["--index", bare, "--s3-endpoint-url", s3_endpoint, "--workers", "2"])
    beside = resolve_source(DataSource(shards=bare), s3_endpoint)
    assert _counts(beside) == expected and beside.counted_from == {"manifest.json": 5}


def _stream_ids(cfg: DataConfig, **kwargs) -> tuple[list[tuple[int, int]], object]:
    stream = build_train_dataset(cfg, **kwargs)
    ids = [(e, s) for batch in iter_train_batches(stream.dataset, cfg, stream.monitor_name)
           for e, s in zip(batch["epoch"].tolist(), batch["sample_id"].tolist())]
    return ids, stream


def test_stream_reads_every_success_once_with_txt_or_json_captions(on_s3, s3_endpoint, img2dataset_shards, ray_session):
    total = sum(img2dataset_successes(img2dataset_shards).values())
    base = dict(s3_endpoint_url=s3_endpoint, image_size=16, batch_size=8, shuffle_buffer=0, decode_concurrency=1,
                decode_batch_size=8, read_block_samples=16)
    for caption_key in (None, "caption"):
        cfg = DataConfig(shards=f"{on_s3}/{{00000..00004}}.tar", caption_key=caption_key, **base)
        ids, stream = _stream_ids(cfg, epochs=1)
        assert len(ids) == len(set(ids)) == total
        counters = stream_counters(stream.monitor_name)
        assert counters["samples_read"] == total and counters["count_mismatch_shards"] == 0
        assert sum(counters[k] for k in ("missing_caption", "missing_image", "bad_json", "decode_error")) == 0
    wrong_key = DataConfig(shards=on_s3, caption_key="no_such_field", max_error_fraction=1.0, **base)
    ids, stream = _stream_ids(wrong_key, epochs=1)
    assert ids == [] and stream_counters(stream.monitor_name)["missing_caption"] == total


def test_two_weighted_sources_mix_in_proportion_and_resume_exactly(ray_session, img2dataset_shards,
                                                                  fashion_mnist_shards):
    stamps = sum(img2dataset_successes(img2dataset_shards).values())
    cfg = DataConfig(sources=[{"shards": str(img2dataset_shards), "weight": 2.0, "name": "stamps"},
                              {"shards": fashion_mnist_shards, "weight": 0.5, "name": "fashion"}],
                     image_size=16, batch_size=8, shuffle_buffer=0, decode_concurrency=1, decode_batch_size=8,
                     read_concurrency=1, read_block_samples=32)
    everything, stream = _stream_ids(cfg, epochs=2)
    names = stream_visit_names(stream.monitor_name)
    per_epoch = Counter((e, names[s >> SHARD_ID_BITS].split("/")[0]) for e, s in everything)
    for epoch in (0, 1):  # weights are exact per epoch: every stamp shard twice, 3 of 6 fashion shards (500 each)
        assert per_epoch[(epoch, "stamps")] == 2 * stamps and per_epoch[(epoch, "fashion")] == 1500
    counters = stream_counters(stream.monitor_name)
    assert counters["source/stamps/samples_consumed"] == 4 * stamps and counters["source/fashion/samples_consumed"] == 3000

    # stop part-way, save the position a checkpoint would hold, resume: nothing repeated, nothing missed
    first = build_train_dataset(cfg, epochs=2)
    keys = stream_visit_names(first.monitor_name)
    consumed: dict[tuple[int, str], list[int]] = {}
    for batch in iter_train_batches(first.dataset, cfg, first.monitor_name):
        for epoch, sample in zip(batch["epoch"].tolist(), batch["sample_id"].tolist()):
            consumed.setdefault((epoch, keys[sample >> SHARD_ID_BITS]), []).append(sample & 0xFFFFFFFF)
        if sum(map(len, consumed.values())) >= len(everything) * 0.4:
            break
    saved = DataPosition.from_json(json.loads(json.dumps(
        DataPosition.of_samples(stream_position(first.monitor_name), consumed).to_json())))
    resumed = build_train_dataset(cfg, epochs=2, position=saved.stream)
    skip = saved.consumed_ordinals()
    rest = [(e, s) for batch in iter_train_batches(resumed.dataset, cfg, resumed.monitor_name)
            for e, s in zip(batch["epoch"].tolist(), batch["sample_id"].tolist())
            if (s & 0xFFFFFFFF) not in skip.get((e, keys[s >> SHARD_ID_BITS]), ())]
    before = [(e, (names.index(k) << SHARD_ID_BITS) | o) for (e, k), ords in consumed.items() for o in ords]
    assert len(rest) == len(set(rest)) and not set(rest) & set(before)
    assert sorted(before + rest) == sorted(everything)


def test_pretrain_job_trains_on_img2dataset_output_local_braces_and_s3_prefix(img2dataset_shards, on_s3, s3_endpoint,
                                                                              tmp_path):
    config = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text())
    config["data"] = {"sources": [{"shards": f"{img2dataset_shards}/{{00000..00004}}.tar", "name": "local"},
                                  {"shards": on_s3, "name": "bucket", "weight": 0.6}],
                      "s3_endpoint_url": s3_endpoint, "decode_concurrency": 1, "shuffle_buffer": 64}
    config["deepspeed"].update(micro_batch_size=16)
    config["schedule"].update(warmup_steps=2, total_steps=6)
    config["checkpoint"].update(every_steps=3, storage_path=str(tmp_path / "runs"))
    config["tracking"].update(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", log_every_steps=1, register_model_name=None)
    config["eval"] = {"enabled": False}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "jobs/pretrain.py", "--config", str(tmp_path / "run.yaml")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "(6/6 steps)" in output and "source local: 5 shards, 160 samples (counts from img2dataset stats: 5" in output
    run_id = next(line.split(", run ")[1].split(" at ")[0] for line in output.splitlines() if line.startswith("MLflow: "))
    metrics = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data.metrics
    local, bucket = metrics["data/source/local/samples_consumed"], metrics["data/source/bucket/samples_consumed"]
    assert local > 0 and bucket > 0 and local + bucket == metrics["data/samples_consumed"]
    assert metrics["data/samples_read"] >= metrics["data/samples_consumed"]
