"""Peak memory of reading one WebDataset shard: the streamed read against the whole-shard read it replaced.

    python benchmarks/shard_memory.py [--sizes-mb 50 500] [--block-samples 256] [--json benchmarks/results/shard_memory.jsonl]

Writes one tar per size in img2dataset's layout (``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``, 9-digit keys) in a
temporary folder, deleted at the end. The JPEGs are a few distinct noisy 256x256 images, each sample's copy
made unique by a comment segment, so they do not compress away and writing stays fast. Each read runs in
a fresh Python process that imports everything first, notes its RSS, reads, and reports
``ru_maxrss`` (the process's high-water mark); the growth is the peak minus the RSS just before the read.

* ``new``: ``stream_shard(..., block_samples=256)``, each block consumed and dropped;
* ``old`` (the baseline): ``storage.read_bytes`` + ``parse_shard``, the whole shard in memory.

Prints, per shard size, both growths and old / new; the new path's growth must not follow the shard's
size, so the 500 MB / 50 MB ratio of its growth is printed too.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DISTINCT_IMAGES = 8


def noisy_jpegs(count: int, side: int = 256, seed: int = 0) -> list[bytes]:
    """Gradients with strong noise: ~40 KB each at quality 95, close to img2dataset's 256-px photos."""
    from PIL import Image

    rng, images = np.random.default_rng(seed), []
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    for index in range(count):
        base = (ramp[None, :, None] * (index + 1) / count + ramp[:, None, None] * 0.5) % 256
        pixels = np.clip(base + rng.normal(0, 24, (side, side, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        images.append(buffer.getvalue())
    return images


def unique_copy(jpeg: bytes, key: str) -> bytes:
    """The JPEG with a COM segment naming the key right after SOI: the same image, unique bytes."""
    comment = key.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    archive.addfile(info, io.BytesIO(data))


def write_shard(path: Path, target_bytes: int, jpegs: list[bytes]) -> int:
    """An img2dataset-layout tar of about ``target_bytes``; returns its sample count."""
    written, samples = 0, 0
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        while written < target_bytes:
            key = f"{samples:09d}"
            image = unique_copy(jpegs[samples % len(jpegs)], key)
            caption = f"a noisy gradient number {samples}".encode()
            meta = json.dumps({"key": key, "caption": caption.decode(), "status": "success",
                               "width": 256, "height": 256}).encode()
            for suffix, data in (("jpg", image), ("txt", caption), ("json", meta)):
                add_member(archive, f"{key}.{suffix}", data)
            written += len(image) + len(caption) + len(meta) + 3 * 1024  # headers + padding, roughly
            samples += 1
    return samples


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_read(path: str, how: str, block_samples: int) -> dict:
    """In this (fresh) process: RSS before, the read, and the high-water mark after."""
    from orchestrator import storage
    from orchestrator.data import ShardRead, parse_shard, stream_shard

    location = storage.resolve(path)
    before, peak_before = rss_mb(), peak_rss_mb()
    started = time.perf_counter()
    if how == "new":
        read, samples = ShardRead(), 0
        for block in stream_shard(location, read, block_samples=block_samples):
            samples += len(block)
            del block
    else:
        samples = len(parse_shard(storage.read_bytes(location)).samples)
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    return {"how": how, "samples": samples, "seconds": round(seconds, 2), "rss_before_mb": round(before, 1),
            "peak_before_mb": round(peak_before, 1), "peak_mb": round(peak, 1), "growth_mb": round(peak - before, 1)}


def read_in_fresh_process(path: Path, how: str, block_samples: int) -> dict:
    command = [sys.executable, __file__, "--child", how, str(path), "--block-samples", str(block_samples)]
    result = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--block-samples", type=int, default=256)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "shard_memory.jsonl"))
    parser.add_argument("--child", nargs=2, metavar=("HOW", "TAR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_read(args.child[1], args.child[0], args.block_samples)))
        return
    scratch = Path(tempfile.mkdtemp(prefix="rayclip-shard-memory-"))
    rows = []
    try:
        jpegs = noisy_jpegs(DISTINCT_IMAGES)
        for size_mb in args.sizes_mb:
            path = scratch / f"{size_mb:05d}.tar"
            samples = write_shard(path, size_mb << 20, jpegs)
            shard_mb = path.stat().st_size / 2**20
            new = read_in_fresh_process(path, "new", args.block_samples)
            old = read_in_fresh_process(path, "old", args.block_samples)
            if new["samples"] != samples or old["samples"] != samples:
                raise SystemExit(f"{path.name}: read {new['samples']} / {old['samples']} samples, wrote {samples}")
            rows.append({"shard_mb": round(shard_mb, 1), "samples": samples, "block_samples": args.block_samples,
                         "mean_jpeg_kb": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1), "new": new, "old": old})
            path.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{'shard':>9s} {'samples':>8s} | {'new growth':>10s} {'new peak':>9s} {'new s':>6s} | "
          f"{'old growth':>10s} {'old peak':>9s} {'old s':>6s} | old/new growth")
    for row in rows:
        new, old = row["new"], row["old"]
        print(f"{row['shard_mb']:7.0f}MB {row['samples']:8d} | {new['growth_mb']:8.1f}MB {new['peak_mb']:7.1f}MB "
              f"{new['seconds']:6.2f} | {old['growth_mb']:8.1f}MB {old['peak_mb']:7.1f}MB {old['seconds']:6.2f} | "
              f"{old['growth_mb'] / max(new['growth_mb'], 0.1):6.1f}x")
    block_mb = args.block_samples * rows[0]["mean_jpeg_kb"] / 1024
    print(f"(one block of {args.block_samples} samples holds ~{block_mb:.1f} MB of JPEG bytes; "
          f"RSS before each read ~{rows[0]['new']['rss_before_mb']:.0f} MB of imports)")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(f"new-path growth {last['shard_mb']:.0f}MB / {first['shard_mb']:.0f}MB shard: "
              f"{last['new']['growth_mb'] / max(first['new']['growth_mb'], 0.1):.2f}x (goal ~1.0: does not follow "
              f"the shard's {last['shard_mb'] / first['shard_mb']:.0f}x size); old path: "
              f"{last['old']['growth_mb'] / max(first['old']['growth_mb'], 0.1):.2f}x")
        slope_kb = (last["new"]["growth_mb"] - first["new"]["growth_mb"]) * 1024 / (last["samples"] - first["samples"])
        print(f"new-path growth beyond one block: {slope_kb:.2f} KB per sample of the shard")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as handle:
            handle.writelines(json.dumps({"benchmark": "shard_memory", "cpus": os.cpu_count(), **row}) + "\n"
                              for row in rows)


if __name__ == "__main__":
    main()
