"""How far the read stage runs ahead of a slow trainer that stops early: bounded (auto) vs unbounded.

    python benchmarks/read_ahead.py [--samples 4000] [--shard-sizes 500] [--read-ahead-s 1] [--json out.jsonl]

Writes Fashion-MNIST shards (``prepare_shards``) per ``--shard-sizes`` and streams them for ``--epochs`` epochs
at 32 px through ``build_train_dataset`` + ``iter_train_batches`` on a local Ray (4 CPUs, one decode
actor), consumed by a trainer that sleeps per batch so that it is ``--slowdown`` times slower than the
decode stage (measured first, on one core), and that stops at ``--stop-fraction`` of the planned samples,
like a run that ends early. Each layout runs with:

* ``auto``: ``read_ahead_batches: auto`` (the pipeline's buffers + ``read_ahead_s`` of consumption; the
  runs here last seconds, so ``read_ahead_s`` is scaled down from its 20 s default with them);
* ``auto, batch blocks``: the same, with Ray Data's ``target_max_block_size`` set to about one decode
  batch while the stream is built, so each decode batch leaves as its own block (by default a task's
  output leaves in blocks of up to 128 MiB: at 32 px, one block per shard);
* ``unbounded`` (the baseline: the behaviour before the bound).

Prints ``data/samples_read`` against ``data/samples_consumed`` at the stop and their ratio; the bounded
run should read only a little more than it consumed. A stream that yields no batch for ``--stall-s``
(3 minutes for the first, while actors start) is reported as stalled, with its counters, and ended by
killing its monitor (the benchmark never hangs).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from stream_watch import consume_watched

from orchestrator import storage
from orchestrator.data import (
    DataConfig,
    DecodeAugmentTokenize,
    ShardOptions,
    ShardRead,
    build_train_dataset,
    fashion_mnist_records,
    prepare_shards,
    read_ahead_bound,
    stream_shard,
)

IMAGE_SIZE, BATCH_SIZE = 32, 64
VARIANTS = ("auto", "auto, batch blocks", "unbounded")


def decode_rate(tar: str) -> float:
    """Samples/s of the decode stage on one core, over one shard (what the trainer is made slower than)."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    stage = DecodeAugmentTokenize(IMAGE_SIZE, "uint8", 77, monitor_name=None)
    samples = [s for block in stream_shard(storage.resolve(tar), ShardRead(), block_samples=256) for s in block]
    started = time.perf_counter()
    for start in range(0, len(samples), BATCH_SIZE):
        chunk = samples[start:start + BATCH_SIZE]
        stage({"image": np.array([s.image for s in chunk], dtype=object),
               "caption": np.array([s.caption for s in chunk], dtype=object),
               "epoch": np.zeros(len(chunk), np.int32), "shard_index": np.zeros(len(chunk), np.int32),
               "sample_id": np.arange(len(chunk), dtype=np.int64)})
    return len(samples) / (time.perf_counter() - started)


def build_stream(cfg: DataConfig, epochs: int, batch_blocks: bool):
    """The training stream; with ``batch_blocks``, built under a Ray Data context whose target block size
    is ~one decode batch (the dataset keeps a copy of the context it was built under)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = context.target_max_block_size
    if batch_blocks:
        row_bytes = cfg.image_size ** 2 * 3 + cfg.context_length * 8 + 16  # image + tokens + ids
        context.target_max_block_size = int(0.9 * cfg.decode_batch_size * row_bytes)
    try:
        return build_train_dataset(cfg, epochs=epochs)
    finally:
        context.target_max_block_size = saved


def run_case(folder: str, variant: str, read_ahead_s: float, epochs: int, stop_fraction: float,
             sleep_s: float, stall_s: float) -> dict:
    read_ahead = "unbounded" if variant == "unbounded" else "auto"
    cfg = DataConfig(shards=folder, image_size=IMAGE_SIZE, batch_size=BATCH_SIZE, shuffle_buffer=0,
                     decode_concurrency=1, decode_batch_size=BATCH_SIZE, read_ahead_batches=read_ahead,
                     read_ahead_s=read_ahead_s)
    stream = build_stream(cfg, epochs, batch_blocks=variant == "auto, batch blocks")
    planned = stream.samples_per_epoch * epochs
    consumed = [0]

    def slow_train_step(batch) -> bool:
        time.sleep(sleep_s)
        consumed[0] += len(batch["image"])
        return consumed[0] >= stop_fraction * planned

    watched = consume_watched(stream, cfg, slow_train_step, stall_s=stall_s)
    counters = watched.counters
    return {"read_ahead": variant, "read_ahead_s": read_ahead_s if read_ahead == "auto" else None,
            "outcome": watched.outcome, "detail": watched.detail, "planned": planned,
            "samples_read": counters["samples_read"], "samples_consumed": counters["samples_consumed"],
            "shards_read": counters["shards_read"], "window_at_stop": watched.window,
            "stall_passes": counters.get("read_ahead_stall_passes"),  # reads let past the window, where counted
            "floor": read_ahead_bound(cfg, 1).floor, "wall_s": round(watched.seconds, 1)}


def measure(args) -> list[dict]:
    """Every variant over every shard layout, on one local Ray."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="rayclip-read-ahead-") as scratch:
            records = fashion_mnist_records("train")[:args.samples]
            for shard_size in args.shard_sizes:
                folder = os.path.join(scratch, f"shards-{shard_size}")
                prepare_shards(records, folder, ShardOptions(shard_size=shard_size), workers=2,
                               progress=lambda *counts: None)
                rate = decode_rate(os.path.join(folder, "00000.tar"))
                sleep_s = args.slowdown * BATCH_SIZE / rate
                for variant in VARIANTS:
                    row = run_case(folder, variant, args.read_ahead_s, args.epochs, args.stop_fraction, sleep_s,
                                   args.stall_s)
                    rows.append({"shard_size": shard_size, "decode_rate": round(rate),
                                 "sleep_ms": round(sleep_s * 1e3, 1), **row})
    finally:
        ray.shutdown()
    return rows


def report(rows: list[dict], args) -> None:
    print(f"{args.samples} samples x {args.epochs} epochs, stop at {args.stop_fraction:.0%}, trainer "
          f"{args.slowdown:.0f}x slower than decode ({rows[0]['decode_rate']} samples/s on one core)")
    print(f"{'shard':>6s} {'read_ahead':>26s} {'outcome':>8s} {'data/samples_read':>18s} "
          f"{'data/samples_consumed':>22s} {'read/consumed':>14s} {'window':>7s} {'passes':>6s} {'wall':>6s}")
    for row in rows:
        label = row["read_ahead"] + (f" ({row['read_ahead_s']:g} s)" if row["read_ahead_s"] else "")
        ratio = f"{row['samples_read'] / row['samples_consumed']:.2f}x" if row["samples_consumed"] else "-"
        window = "-" if row["window_at_stop"] is None else f"{row['window_at_stop']:.0f}"
        print(f"{row['shard_size']:6d} {label:>26s} {row['outcome']:>8s} {row['samples_read']:18d} "
              f"{row['samples_consumed']:22d} {ratio:>14s} {window:>7s} {row['stall_passes']!s:>6s} "
              f"{row['wall_s']:5.0f}s")
        if row["detail"]:
            print(f"{'':6s} {row['detail']} (window floor {row['floor']}, {row['shards_read']} shards read)")
    for shard_size in args.shard_sizes:
        layout = {row["read_ahead"]: row for row in rows if row["shard_size"] == shard_size}
        baseline = layout["unbounded"]
        for variant in VARIANTS[:-1]:
            if layout[variant]["outcome"] == "stopped" and baseline["outcome"] == "stopped":
                ahead = layout[variant]["samples_read"] - layout[variant]["samples_consumed"]
                print(f"shards of {shard_size}, {variant}: read beyond consumption {ahead} samples, "
                      f"{ahead / max(1, baseline['samples_read'] - baseline['samples_consumed']):.2f}x unbounded's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000, help="Fashion-MNIST training images written")
    parser.add_argument("--shard-sizes", type=int, nargs="+", default=[500])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--stop-fraction", type=float, default=0.6)
    parser.add_argument("--slowdown", type=float, default=3.0, help="trainer time per sample / decode time")
    parser.add_argument("--read-ahead-s", type=float, default=1.0)
    parser.add_argument("--stall-s", type=float, default=60.0, help="seconds without a batch that count as a stall")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "read_ahead.jsonl"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    rows = measure(args)
    report(rows, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as handle:
            handle.writelines(json.dumps({"benchmark": "read_ahead", "samples": args.samples, "epochs": args.epochs,
                                          "stop_fraction": args.stop_fraction, "cpus": os.cpu_count(), **row}) + "\n"
                              for row in rows)


if __name__ == "__main__":
    main()
