"""Prepare -> S3 (moto's HTTP server) -> Ray Data -> a 2-worker Ray Train run, plus resume and the held-out split.

Fashion-MNIST is cut to 48 images per split in shards of 12, so a full run takes seconds, not minutes.
"""

from __future__ import annotations

import json

import boto3
import pytest

from orchestrator.data import (
    DataConfig,
    StreamProgress,
    build_train_dataset,
    exact_once_data_config,
    iter_train_batches,
    stream_counters,
    stream_position,
)
from orchestrator.data import FASHION_MNIST_CLASSES, ShardOptions, prepare_fashion_mnist, read_idx
from orchestrator.eval import Preprocess, limit_set, open_eval_set, read_part

pytestmark = pytest.mark.integration

PER_SPLIT = 48
SHARD_SIZE = 12
BUCKET = "rayclip-stream"


@pytest.fixture(scope="module")
def fashion_on_s3(s3_endpoint, ray_session) -> str:
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    url = f"s3://{BUCKET}/fashion"
    prepare_fashion_mnist(url, ShardOptions(shard_size=SHARD_SIZE), limit=PER_SPLIT, endpoint_url=s3_endpoint,
                          workers=2, progress=lambda *counts: None)
    return url


def _cfg(url: str, endpoint: str, **overrides) -> DataConfig:
    base = dict(shards=url, s3_endpoint_url=endpoint, image_size=16, batch_size=8, shuffle_buffer=16,
                decode_concurrency=1, decode_batch_size=8, read_concurrency=2)
    return DataConfig(**{**base, **overrides})


def _all_ids(num_shards: int) -> set[int]:
    return {(shard << 32) | ordinal for shard in range(num_shards) for ordinal in range(SHARD_SIZE)}


def test_prepare_wrote_manifest_and_shards_to_s3_and_resumes(fashion_on_s3, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = {obj["Key"] for obj in s3.list_objects_v2(Bucket=BUCKET, Prefix="fashion/")["Contents"]}
    assert {f"fashion/{i:05d}.tar" for i in range(4)} <= keys and "fashion/heldout/manifest.json" in keys
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key="fashion/manifest.json")["Body"].read())
    assert manifest["total_samples"] == PER_SPLIT and manifest["extra"]["heldout_template"] == "a photo of a {}."
    prepare_fashion_mnist(fashion_on_s3, ShardOptions(shard_size=SHARD_SIZE), limit=PER_SPLIT,
                          endpoint_url=s3_endpoint, workers=2, progress=lambda *counts: None)
    report = json.loads(s3.get_object(Bucket=BUCKET, Key="fashion/prepare_report.json")["Body"].read())
    assert report["kept_shards"] == 4 and report["written"] == PER_SPLIT


def _train_loop(config: dict) -> None:
    import ray.train

    cfg = DataConfig(**config["data"])
    rank = ray.train.get_context().get_world_rank()
    seen, shapes = [], set()
    shard = ray.train.get_dataset_shard("train")
    for batch in iter_train_batches(shard, cfg, config["monitor"], rank=rank):
        seen += list(zip(batch["epoch"].tolist(), batch["sample_id"].tolist()))
        shapes.add((tuple(batch["image"].shape[1:]), str(batch["image"].dtype), batch["text"].shape[1]))
    with open(f"{config['out']}/rank{rank}.json", "w") as handle:
        json.dump({"seen": seen, "shapes": [list(map(str, s)) for s in shapes]}, handle)


def test_two_worker_train_run_sees_every_sample_once_per_epoch(fashion_on_s3, s3_endpoint, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = _cfg(fashion_on_s3, s3_endpoint)
    stream = build_train_dataset(cfg, epochs=2)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"data": cfg.model_dump(), "monitor": stream.monitor_name, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        datasets={"train": stream.dataset},
        dataset_config=exact_once_data_config(),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="data-once"),
    )
    trainer.fit()
    per_rank = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    seen = [tuple(pair) for result in per_rank for pair in result["seen"]]
    assert all(result["seen"] for result in per_rank), "each worker must get part of the stream"
    assert len(seen) == len(set(seen)) == 2 * PER_SPLIT
    for epoch in (0, 1):
        assert {sample for e, sample in seen if e == epoch} == _all_ids(4)
    assert {tuple(s) for r in per_rank for s in r["shapes"]} == {("(16, 16, 3)", "torch.uint8", "77")}
    counters = stream_counters(stream.monitor_name)
    assert counters["samples_consumed"] == 2 * PER_SPLIT and counters["decode_error"] == 0
    assert stream_position(stream.monitor_name) == StreamProgress(epoch=2)


def test_resume_neither_repeats_nor_skips_beyond_shards_in_flight(fashion_on_s3, s3_endpoint):
    cfg = _cfg(fashion_on_s3, s3_endpoint, shuffle_buffer=0, read_concurrency=1)
    first = build_train_dataset(cfg, epochs=2)
    consumed = []
    for batch in iter_train_batches(first.dataset, cfg, first.monitor_name):
        consumed += list(zip(batch["epoch"].tolist(), batch["sample_id"].tolist()))
        if len(consumed) >= 5 * SHARD_SIZE:
            break
    position = stream_position(first.monitor_name)
    assert position.epoch == 1 or position.completed, position
    saved = StreamProgress.from_json(json.loads(json.dumps(position.to_json())))  # as a checkpoint keeps it
    resumed = build_train_dataset(cfg, epochs=2, position=saved)
    replayed = [(b_e, s) for batch in iter_train_batches(resumed.dataset, cfg, resumed.monitor_name)
                for b_e, s in zip(batch["epoch"].tolist(), batch["sample_id"].tolist())]
    assert len(replayed) == len(set(replayed))
    everything = {(epoch, sample) for epoch in (0, 1) for sample in _all_ids(4)}
    assert set(consumed) | set(replayed) == everything
    done = {(e, int(name[:5])) for e, names in position.completed.items() for name in names}
    done |= {(e, s) for e in range(position.epoch) for s in range(4)}
    repeated = set(consumed) & set(replayed)
    assert all((epoch, sample >> 32) not in done for epoch, sample in repeated)
    assert all((epoch, sample >> 32) not in done for epoch, sample in replayed)


def test_heldout_split_on_s3_is_an_evaluation_set_with_labels_class_names_and_template(fashion_on_s3, s3_endpoint):
    cfg = _cfg(fashion_on_s3, s3_endpoint)
    heldout = open_eval_set(fashion_on_s3, endpoint_url=s3_endpoint)  # the root: its heldout/ is the test split
    assert heldout.layout == "rayclip" and heldout.url == cfg.heldout_url and heldout.samples == PER_SPLIT
    assert heldout.class_names == list(FASHION_MNIST_CLASSES) and heldout.templates == ["a photo of a {}."]
    samples = [sample for part in heldout.parts for block in read_part(heldout, part) for sample in block]
    labels = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")[:PER_SPLIT]
    assert [sample.label for sample in samples] == labels.tolist() and not any(s.error for s in samples)
    pixels = Preprocess(32)([sample.image for sample in samples[:10]])
    assert pixels.images.shape == (10, 3, 32, 32) and all(pixels.decoded)
    first = limit_set(heldout, 15)  # 12 a shard: one whole shard and 3 of the next
    assert [p.limit for p in first.parts] == [None, 3]
    assert sum(len(b) for p in first.parts for b in read_part(first, p)) == 15
