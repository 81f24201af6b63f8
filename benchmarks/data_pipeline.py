"""Samples/s per core for decode + train augmentation + tokenization, side by side on the same shards.

    python benchmarks/data_pipeline.py [--workdir /tmp/rayclip-bench] [--image-size 224] [--json out.json]

Shards: the 12 Debian ``mate-backgrounds`` photos (2560x1600), each cut into 30 random crops, plus the Tux Paint
stamps, written at a 256-px maximum side by ``orchestrator.data`` (~1,150 samples). Paths compared:

Each 1-core path runs ``--rounds`` times, interleaved with the others; the median round is reported.

* ``open_clip``: open_clip-train's WebDataset pipeline (tar -> decode("pilrgb") -> open_clip's train transform
  -> open_clip's tokenizer), one process, one torch thread: its per-core rate.
* ``rayclip stage``: our read stage's streamed tar split (``stream_shard`` in blocks of
  ``read_block_samples``, as the read tasks do) + ``DecodeAugmentTokenize``, one process, one thread.
* ``decode floor``: the same streamed tar split + the stream's JPEG decoder (torchvision) and nothing else;
  ``PIL decode floor`` the same with PIL (open_clip's decoder). No pipeline using that decoder can beat its floor.
* ``ray data xN``: the full ``build_train_dataset`` stream with N decode actors, consumed on the driver
  through ``iter_train_batches`` (so the read-ahead bound, ``read_ahead_batches: auto``, sees what is
  consumed), steady state (the samples between 30% and 95% of the run, past start-up and the initial
  prefetch), to show whether the Ray Data path scales with CPUs (on a 2-core machine shared with the
  driver, N = 2 competes with the consumer and Ray's own processes); ``unbounded`` the same without the
  bound, to show what the bound costs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from stream_watch import consume_watched

from orchestrator import storage
from orchestrator.data import (
    DataConfig,
    DecodeAugmentTokenize,
    RawSample,
    ShardRead,
    build_train_dataset,
    decode_image,
    stream_shard,
)
from orchestrator.data import ShardOptions, SourceRecord, captioned_folder_records, prepare_shards

PHOTOS = Path("/usr/share/backgrounds/mate/nature")
STAMPS = "/usr/share/tuxpaint/stamps"


def photo_crop_records(crops_per_photo: int, seed: int = 0) -> list[SourceRecord]:
    """Random crops (30-100% of the short side) of the large photos: many distinct photo-like samples."""
    from PIL import Image

    rng, records = np.random.default_rng(seed), []
    for path in sorted(PHOTOS.glob("*.jpg")):
        photo = np.asarray(Image.open(path).convert("RGB"))
        height, width = photo.shape[:2]
        for index in range(crops_per_photo):
            side = int(rng.uniform(0.3, 1.0) * min(height, width))
            top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
            crop = np.ascontiguousarray(photo[top:top + side, left:left + side])
            records.append(SourceRecord(crop, f"a photo of {path.stem.lower()} number {index}", f"{path.name}#{index}"))
    return records


def make_shards(folder: Path, crops_per_photo: int) -> list[str]:
    if not (folder / "manifest.json").exists():
        records = photo_crop_records(crops_per_photo) + [r for r in captioned_folder_records(STAMPS) if r.caption]
        prepare_shards(records, str(folder), ShardOptions(shard_size=200, max_side=256), workers=2,
                       progress=lambda *counts: None)
    return sorted(str(path) for path in folder.glob("*.tar"))


def timed(run) -> tuple[int, float]:
    start = time.perf_counter()
    count = run()
    return count, time.perf_counter() - start


def open_clip_pipeline(tars: list[str], image_size: int, batch_size: int) -> int:
    import open_clip
    import webdataset as wds

    preprocess = open_clip.image_transform(image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(tars), wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.select(lambda s: ("txt" in s) and any(k in s for k in ("png", "jpg", "jpeg", "webp"))),
        wds.decode("pilrgb", handler=wds.warn_and_continue), wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]), wds.to_tuple("image", "text"),
        wds.batched(batch_size, partial=True))
    return sum(len(images) for images, _ in pipeline)


def streamed_blocks(tars: list[str]) -> Iterator[list[RawSample]]:
    """The shards' good samples as the stream's read tasks read them: streamed, in blocks of the default size."""
    block_samples = DataConfig.model_fields["read_block_samples"].default
    for tar in tars:
        yield from stream_shard(storage.resolve(tar), ShardRead(), block_samples=block_samples)


def streamed_samples(tars: list[str]) -> Iterator[RawSample]:
    return (sample for block in streamed_blocks(tars) for sample in block)


def rayclip_stage(tars: list[str], image_size: int, batch_size: int) -> int:
    stage = DecodeAugmentTokenize(image_size, "uint8", 77, monitor_name=None)
    count = 0
    for samples in streamed_blocks(tars):
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            batch = {"image": np.array([s.image for s in chunk], dtype=object),
                     "caption": np.array([s.caption for s in chunk], dtype=object),
                     "epoch": np.zeros(len(chunk), np.int32), "shard_index": np.zeros(len(chunk), np.int32),
                     "sample_id": np.arange(len(chunk), dtype=np.int64)}
            count += len(stage(batch)["image"])
    return count


def decode_floor(tars: list[str]) -> int:
    """Tar split + the stream's own decoder (torchvision, libjpeg-turbo) to a CHW uint8 tensor."""
    return sum(decode_image(s.image).shape[0] > 0 for s in streamed_samples(tars))


def pil_decode_floor(tars: list[str]) -> int:
    """The same with PIL -> RGB numpy array (what open_clip's ``decode("pilrgb")`` starts from)."""
    import io

    from PIL import Image

    return sum(np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")).shape[0] > 0 for s in streamed_samples(tars))


def ray_data_steady_rate(folder: Path, image_size: int, batch_size: int, actors: int, epochs: int,
                         read_ahead: str, stall_s: float) -> tuple[int, float] | str:
    """The full stream consumed on the driver; (samples, seconds) between 30% and 95% of the run's samples,
    or what the stream stalled at (no batch for ``stall_s``, 3 minutes for the first: it never hangs).

    Start-up (actors, planning) and the blocks Ray Data prefetches before the first batch would inflate a
    rate counted from the first batch; the window starts well after them."""
    cfg = DataConfig(shards=str(folder), image_size=image_size, batch_size=batch_size, shuffle_buffer=0,
                     decode_concurrency=actors, decode_batch_size=batch_size, read_ahead_batches=read_ahead)
    stream = build_train_dataset(cfg, epochs=epochs)
    marks = []

    def mark(batch) -> bool:
        marks.append(((marks[-1][0] if marks else 0) + len(batch["image"]), time.perf_counter()))
        return False

    watched = consume_watched(stream, cfg, mark, stall_s=stall_s)
    if watched.outcome != "finished":
        return (f"{watched.outcome} ({watched.detail}): data/samples_read {watched.counters['samples_read']}, "
                f"data/samples_consumed {watched.counters['samples_consumed']}, read-ahead window {watched.window}")
    count = marks[-1][0]
    first = next(mark for mark in marks if mark[0] >= 0.30 * count)
    last = next(mark for mark in marks if mark[0] >= 0.95 * count)
    return last[0] - first[0], last[1] - first[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/rayclip-bench")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--crops-per-photo", type=int, default=30)
    parser.add_argument("--max-actors", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--epochs", type=int, default=8, help="epochs streamed by the Ray Data runs")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the 1-core paths (median)")
    parser.add_argument("--stall-s", type=float, default=60.0, help="a Ray Data run with no batch this long is reported stalled")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    import torch

    torch.set_num_threads(1)
    folder = Path(args.workdir) / "shards"
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}})
    tars = make_shards(folder, args.crops_per_photo)
    size, batch = args.image_size, args.batch_size
    rayclip_stage(tars[:1], size, batch)  # warm caches (tokenizer files, page cache) before timing
    open_clip_pipeline(tars[:1], size, batch)
    single_core = {"open_clip (1 core)": lambda: open_clip_pipeline(tars, size, batch),
                   "rayclip stage (1 core)": lambda: rayclip_stage(tars, size, batch),
                   "decode floor (1 core)": lambda: decode_floor(tars),
                   "PIL decode floor (1 core)": lambda: pil_decode_floor(tars)}
    rounds = {name: [] for name in single_core}
    for _ in range(args.rounds):  # interleaved, so a burst of load from elsewhere hits every path alike
        for name, run in single_core.items():
            rounds[name].append(timed(run))
    results = {name: sorted(runs, key=lambda run: run[1])[len(runs) // 2] for name, runs in rounds.items()}
    stalls = {}
    for actors in range(1, args.max_actors + 1):
        for read_ahead, name in (("auto", f"ray data x{actors} actors"), ("unbounded", f"ray data x{actors}, unbounded")):
            outcome = ray_data_steady_rate(folder, size, batch, actors, args.epochs, read_ahead, args.stall_s)
            (stalls if isinstance(outcome, str) else results)[name] = outcome
    ray.shutdown()
    rates = {name: count / seconds for name, (count, seconds) in results.items()}
    for name, (count, seconds) in results.items():
        print(f"{name:28s} {count:6d} samples {seconds:7.2f} s {rates[name]:8.1f} samples/s")
    for name, outcome in stalls.items():
        print(f"{name:28s} {outcome}")
    ours = rates["rayclip stage (1 core)"]
    print(f"rayclip / open_clip per core: {ours / rates['open_clip (1 core)']:.2f}x (goal >= 1.0)")
    print(f"rayclip / decode floor:       {ours / rates['decode floor (1 core)']:.0%} (goal >= 70%)")
    print(f"rayclip / PIL decode floor:   {ours / rates['PIL decode floor (1 core)']:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"samples_per_s": rates, "not_finished": stalls, "cpus": os.cpu_count()},
                                              indent=1))


if __name__ == "__main__":
    main()
