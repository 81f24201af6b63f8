"""How long a checkpoint stops training: uploaded before training goes on (the baseline) vs in the background.

    python benchmarks/checkpoint_stall.py [--models ViT-tiny ViT-B/32] [--targets local s3] [--json out.jsonl]

For each model, a real DeepSpeed engine (ZeRO-1, fp32 on CPU, a world of one, the default config otherwise) trains
a few steps so that Adam's moments exist, then saves checkpoints through ``orchestrator.train.checkpoint_upload`` into a
run folder on local disk or on S3 (moto's server on 127.0.0.1, a real HTTP endpoint):

* ``upload first`` (``checkpoint.background: false``, the baseline): the local write plus the upload (hashing
  included), which the training thread waited for;
* ``background`` (the default): the local write only; the upload runs on a thread while training goes on.

Both leave the same files. What completing a checkpoint adds on the training thread once the upload is done
(gathering each rank's file table, the manifest, Ray Train's report) is a few small messages and one small file,
the same in both modes, and is left out here because Ray Train's report needs a Ray Train worker.

It also times training steps while a background upload runs against steps without one (on this 2-core machine
the upload's copying and hashing compete with the step for the cores), and prints the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.local_servers import free_port, moto_server  # noqa: E402

AWS = {"AWS_ACCESS_KEY_ID": "benchmark", "AWS_SECRET_ACCESS_KEY": "benchmark", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _steps_s(worker, images, tokens, steps: int) -> list[float]:
    from orchestrator.train import optimizer_step

    times = []
    for _ in range(steps):
        began = time.perf_counter()
        optimizer_step(worker, images, tokens)
        times.append(time.perf_counter() - began)
    return times


def measure(model: str, target: str, s3_url: str | None, repeats: int, steps: int) -> dict:
    from harness.train_path import build_worker, synthetic_batch
    from models import channels_last_batch_to_model
    from orchestrator import runs
    from orchestrator.config import load_config
    from orchestrator.train.checkpoint_upload import start_checkpoint

    cfg = load_config(ROOT / "configs" / "local.yaml", [f"model.name={model}", "deepspeed.micro_batch_size=8"])
    worker = build_worker(cfg)
    images, tokens, _, _ = synthetic_batch(cfg, 8, worker.engine.device)
    pixels = channels_last_batch_to_model(images, worker.dtype)
    _steps_s(worker, pixels, tokens, 2)  # Adam's moments exist from the first step
    scratch = tempfile.mkdtemp(prefix="rayclip-stall-")
    storage_path = os.path.join(scratch, "runs") if target == "local" else f"s3://stall/{os.path.basename(scratch)}"
    run = runs.run_location(storage_path, s3_url, "r")
    upload_first, background, after_write, size = [], [], [], 0
    try:
        for _ in range(repeats):
            for mode in ("upload first", "background"):
                worker.state.step += 1
                began = time.perf_counter()
                pending = start_checkpoint(worker.engine, worker.state, 0, {}, run)
                if mode == "upload first":
                    pending.thread.join()
                    upload_first.append(time.perf_counter() - began)
                else:
                    background.append(pending.paused_s)
                    after_write.extend(_steps_s(worker, pixels, tokens, steps))
                    pending.thread.join()
                assert pending.outcome[1] is None, pending.outcome[1]
                size = sum(entry["size"] for entry in pending.outcome[0].values())
                runs.remove_checkpoint(pending.target)  # moto keeps what it stores in memory
        alone = _steps_s(worker, pixels, tokens, steps * repeats)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    stall_first, stall_background = statistics.median(upload_first), statistics.median(background)
    record = {"model": model, "target": target, "checkpoint_mb": round(size / 1e6, 1),
              "stall_upload_first_s": round(stall_first, 3), "stall_background_s": round(stall_background, 3),
              "stall_ratio": round(stall_first / stall_background, 1),
              "step_s_alone": round(statistics.median(alone), 4),
              "step_s_during_upload": round(statistics.median(after_write), 4)}
    record["step_slowdown_during_upload"] = round(record["step_s_during_upload"] / record["step_s_alone"], 2)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ViT-tiny", "ViT-B/32"])
    parser.add_argument("--targets", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    parser.add_argument("--repeats", type=int, default=3, help="checkpoints per mode (the median is printed)")
    parser.add_argument("--steps", type=int, default=3, help="training steps timed after each background write")
    parser.add_argument("--json", help="append each result as a JSON line to this file")
    args = parser.parse_args()
    os.environ.update(AWS)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                        "LOCAL_RANK": "0"}.items():  # a world of one
        os.environ.setdefault(name, value)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as servers:
        s3_url = None
        if "s3" in args.targets:
            import boto3

            s3_url = servers.enter_context(moto_server(os.path.join(scratch, "moto.log")))
            boto3.client("s3", endpoint_url=s3_url).create_bucket(Bucket="stall")
        for model in args.models:
            for target in args.targets:
                record = measure(model, target, s3_url, args.repeats, args.steps)
                print(f"{model:9s} {target:5s} checkpoint {record['checkpoint_mb']:8.1f} MB: training stopped "
                      f"{record['stall_upload_first_s']:.3f} s uploading first (baseline), "
                      f"{record['stall_background_s']:.3f} s with the background upload "
                      f"(baseline / background {record['stall_ratio']}); the {args.steps} steps after the write "
                      f"{record['step_slowdown_during_upload']}x as long as without an upload", flush=True)
                if args.json:
                    with open(args.json, "a") as handle:
                        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
