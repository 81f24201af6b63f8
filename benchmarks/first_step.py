"""Time from `python jobs/pretrain.py` to its first training step, cold and warm, and where it goes.

    python benchmarks/first_step.py [--shards data/fashion-mnist] [--runs 2]

Runs the default pretraining job (configs/local.yaml: local Ray, 2 workers, DeepSpeed ZeRO-1 on CPU) for
a few steps, timestamping each line of its output as it arrives:

* cold: a fresh DeepSpeed extension cache (the CPU comm op is compiled, 60-90 s) and a fresh MLflow store;
* warm (the baseline a returning user meets): the extension cache and the store of the cold run reused.

Prints seconds to each milestone (Ray up, engine built, MLflow run open, step 1, the job's exit) per
run, and the ratio of warm to cold time to step 1. Needs the Fashion-MNIST shards of `jobs/demo.py`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MILESTONES = {
    "Ray up": "local Ray started",
    "engine built": "DeepSpeed ZeRO-",
    "MLflow run open": "MLflow experiment",
    "step 1": "step 1/",
}


def timed_job(shards: str, extensions: str, workdir: str) -> dict[str, float]:
    """Seconds from launch to each milestone's first line, and to the job's exit."""
    command = [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--set", f"data.shards={shards}",
               "--set", "schedule.total_steps=12", "--set", "schedule.warmup_steps=2", "--set", "eval.enabled=false",
               "--set", "tracking.log_every_steps=1", "--set", "checkpoint.every_steps=1000"]
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": extensions, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "DS_ACCELERATOR": "cpu", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    started = time.monotonic()
    seen: dict[str, float] = {}
    with subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as job:
        for line in job.stdout:
            for name, marker in MILESTONES.items():
                if name not in seen and "[rayclip]" in line and marker in line:
                    seen[name] = time.monotonic() - started
    if job.returncode != 0:
        raise SystemExit(f"the job failed (exit {job.returncode})")
    seen["exit"] = time.monotonic() - started
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=str(ROOT / "data" / "fashion-mnist"))
    parser.add_argument("--runs", type=int, default=2, help="warm runs after the cold one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        extensions, workdir = os.path.join(scratch, "extensions"), os.path.join(scratch, "job")
        os.makedirs(workdir)
        runs = [("cold", timed_job(args.shards, extensions, workdir))]
        runs += [(f"warm {i + 1}", timed_job(args.shards, extensions, workdir)) for i in range(args.runs)]
    names = [*MILESTONES, "exit"]
    print(f"{'run':8s} " + " ".join(f"{name:>16s}" for name in names))
    for label, seen in runs:
        print(f"{label:8s} " + " ".join(f"{seen.get(name, float('nan')):15.1f}s" for name in names))
    cold = runs[0][1]["step 1"]
    warm = min(seen["step 1"] for _, seen in runs[1:]) if len(runs) > 1 else float("nan")
    print(f"time to step 1: cold {cold:.1f} s, warm {warm:.1f} s; warm / cold = {warm / cold:.2f}")


if __name__ == "__main__":
    main()
