"""Peak memory of every process of a streamed ImageNet-val-size evaluation, against one 10x smaller.

    python benchmarks/eval_memory.py [--workdir DIR] [--images 50000] [--baseline-images 5000] \
        [--json benchmarks/results/eval_memory.jsonl]

Writes a synthetic set in CLIP_benchmark's WebDataset layout (``classnames.txt`` with ImageNet's 1,000 names,
``zeroshot_classification_templates.txt``, ``test/nshards.txt``, ``test/{0..49}.tar`` of 1,000 ``sNNNNNNN.jpg``
+ ``sNNNNNNN.cls`` each) and a random ViT-tiny as an OpenAI-layout state dict into ``--workdir`` (default a
fixed folder under the temp dir, kept and reused when its ``set.json`` matches, so reruns skip the writing).
The JPEGs are 256 distinct smooth colour patterns with noise, 160-256 px a side, ~10 KB each at quality 85
(~600 MB of tars, written in seconds); each sample's copy is made unique by a comment segment naming its key.
The prompts are the paper's first ``--templates`` (4) of its 80 templates: the text side (4,000 prompts) is the
same at both sizes, and all 80 would spend minutes of a 2-core machine on it.

Then ``jobs/evaluate.py --task zeroshot --no-mlflow --output JSON`` runs twice as a subprocess, with
``--max-images`` at the baseline size first and on the whole set second. Every ``--interval`` seconds the
driver's process tree (the driver, Ray's daemons it started, the workers the raylet forks) is walked and each
process's RSS, USS and PSS read from ``/proc`` (``status`` and ``smaps_rollup``). A worker's role is read off
its process title and kept once it has run a read task or held the model. Printed per role: the peak of one
process at both sizes and their ratio (a bounded evaluation gives ~1.0x, not the sets' 10x), the images/s of
the job's own log line, and wall time; the whole timeline of each run is left in ``--workdir``.

``RAY_ADDRESS`` is removed from the job's environment: joining a cluster would put its workers out of the
driver's process tree. A job whose local Ray misses its fixed 30 s start-up limit (a loaded machine) is rerun.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil

from shard_memory import add_member, unique_copy  # noqa: E402  (the same JPEG-copy and tar-member helpers)

ROOT = Path(__file__).resolve().parents[1]
DISTINCT_IMAGES = 256
SIDES_PX = (160, 256)
JPEG_QUALITY = 85
JOB_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "DS_ACCELERATOR": "cpu", "MLFLOW_DISABLE_TELEMETRY": "true"}
ROLES = ("driver", "encode actor", "read tasks", "decode tasks", "ray data helpers", "idle workers", "ray daemons")
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # retitled like workers, but Ray's own
STARTUP_TIMEOUT = "timed out during startup"  # Ray waits 30 s for its raylet, a fixed limit a busy machine passes
STARTUP_ATTEMPTS = 3
RATE_LINE = re.compile(r"(\d+) images encoded in ([\d.]+) s \((\d+) images/s\)")


def pattern_jpeg(seed: int) -> tuple[bytes, int, int]:
    """A smooth random colour field (a few control points, bicubic) with noise: (JPEG, width, height)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = (int(side) for side in rng.integers(SIDES_PX[0], SIDES_PX[1] + 1, 2))
    grid = rng.integers(0, 256, (rng.integers(3, 9), rng.integers(3, 9), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC), dtype=np.float32)  # (H, W, 3)
    pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), width, height


def write_shard(job: tuple[str, int, int, int, list[bytes]]) -> None:
    """One ``{index}.tar`` of samples ``first .. first + count - 1``, labels cycling over the classes."""
    path, first, count, classes, jpegs = job
    with tarfile.open(path + ".partial", "w", format=tarfile.USTAR_FORMAT) as archive:
        for sample in range(first, first + count):
            key = f"s{sample:07d}"
            add_member(archive, f"{key}.jpg", unique_copy(jpegs[sample % len(jpegs)], key))
            add_member(archive, f"{key}.cls", str(sample % classes).encode())
    os.replace(path + ".partial", path)


def write_set(root: Path, *, images: int, shards: int, templates: int) -> dict:
    """The set in CLIP_benchmark's layout (reused when ``set.json`` says it was written with these settings)."""
    from models import IMAGENET_TEMPLATES, imagenet_classes

    settings = {"images": images, "shards": shards, "templates": templates, "distinct_images": DISTINCT_IMAGES,
                "sides_px": list(SIDES_PX), "jpeg_quality": JPEG_QUALITY}
    marker = root / "set.json"
    if marker.exists() and json.loads(marker.read_text())["settings"] == settings:
        return {**json.loads(marker.read_text()), "written_s": 0.0, "reused": True}
    started = time.perf_counter()
    classes = [name for _, name in imagenet_classes()]
    (root / "test").mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text(
        "\n".join(t.replace("{}", "{c}") for t in IMAGENET_TEMPLATES[:templates]) + "\n")
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool_images = pool.map(pattern_jpeg, range(DISTINCT_IMAGES))
        jpegs = [jpeg for jpeg, _, _ in pool_images]
        per_shard = -(-images // shards)
        jobs = [(str(root / "test" / f"{index}.tar"), index * per_shard, min(per_shard, images - index * per_shard),
                 len(classes), jpegs) for index in range(shards)]
        pool.map(write_shard, jobs)
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    body = {"settings": settings, "jpeg_sizes": [len(jpeg) for jpeg in jpegs],
            "pixel_sizes": [[width, height] for _, width, height in pool_images],
            "bytes_on_disk": sum(path.stat().st_size for path in (root / "test").glob("*.tar"))}
    marker.write_text(json.dumps(body))
    return {**body, "written_s": round(time.perf_counter() - started, 1), "reused": False}


def save_model(path: Path) -> None:
    import torch

    from models import create_model

    if not path.exists():
        torch.manual_seed(0)
        torch.save(create_model("ViT-tiny").openai_state_dict(), path)


def whole_set_cost_mb(layout: dict, images: int, model_px: int) -> dict:
    """What holding ``images`` samples at once would take: their JPEG bytes, and decoded uint8 pixels."""
    jpegs, sizes = layout["jpeg_sizes"], layout["pixel_sizes"]
    pick = [sample % len(jpegs) for sample in range(images)]
    return {"jpeg_mb": round(sum(jpegs[i] + 12 for i in pick) / 2**20, 1),  # + the 12-byte comment segment
            "decoded_native_mb": round(sum(3 * sizes[i][0] * sizes[i][1] for i in pick) / 2**20, 1),
            f"decoded_{model_px}px_mb": round(images * 3 * model_px**2 / 2**20, 1),
            "decoded_224px_mb": round(images * 3 * 224**2 / 2**20, 1)}


def role_of(cmdline: list[str]) -> str:
    """The part a process of the run plays, from its command line (Ray workers retitle themselves)."""
    title = " ".join(cmdline)
    if "EncodeOnActor" in title:
        return "encode actor"
    if "read_rows" in title:
        return "read tasks"
    if "preprocess_rows" in title:
        return "decode tasks"
    if title.startswith(RAY_AGENTS):
        return "ray daemons"
    starting = len(cmdline) > 1 and "python" in os.path.basename(cmdline[0]) and cmdline[1].endswith("default_worker.py")
    if title.startswith("ray::IDLE") or starting:  # a worker not yet retitled is idle too
        return "idle workers"
    if title.startswith("ray::"):
        return "ray data helpers"
    return "ray daemons"


def proc_memory_mb(pid: int) -> dict | None:
    """RSS from ``status``; USS (private pages) and PSS from ``smaps_rollup``; None when the process is gone."""
    fields = {}
    try:
        for name in ("status", "smaps_rollup"):
            with open(f"/proc/{pid}/{name}") as handle:
                for line in handle:
                    key, _, value = line.partition(":")
                    if value.strip().endswith("kB"):
                        fields[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return {"rss": fields.get("VmRSS", 0) / 1024, "pss": fields.get("Pss", 0) / 1024,
            "uss": (fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)) / 1024}


class TreeSampler(threading.Thread):
    """Samples the memory of ``root`` and all its descendants every ``interval`` seconds until stopped."""

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stop_event = threading.Event()
        self.roles: dict[int, str] = {}
        self.daemons: set[str] = set()
        self.titles: dict[str, set[str]] = defaultdict(set)
        self.samples: list[dict] = []  # one per process per tick
        self.started = time.monotonic()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                tree = [psutil.Process(self.root), *psutil.Process(self.root).children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            now = round(time.monotonic() - self.started, 2)
            for proc in tree:
                role = self._role(proc)
                memory = role and proc_memory_mb(proc.pid)
                if memory:
                    self.samples.append({"t": now, "pid": proc.pid, "role": role, **memory})

    def _role(self, proc: psutil.Process) -> str | None:
        if proc.pid == self.root:
            return "driver"
        try:
            cmdline = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return None
        current = role_of(cmdline)
        self.titles[current].add(" ".join(cmdline)[:80].rstrip())
        if current == "idle workers" and proc.pid in self.roles:  # a worker's memory stays with what it ran last
            return self.roles[proc.pid]
        if current == "ray daemons":
            self.daemons.add(proc.name())
        elif current != "idle workers":
            self.roles[proc.pid] = current
        return current


def peaks_by_role(samples: list[dict]) -> dict:
    """Per role: processes seen, the peak RSS / USS of one of them, the peak RSS summed over them at one tick."""
    by_role, summed = defaultdict(list), defaultdict(lambda: defaultdict(float))
    total_pss = defaultdict(float)
    for sample in samples:
        by_role[sample["role"]].append(sample)
        summed[sample["role"]][sample["t"]] += sample["rss"]
        total_pss[sample["t"]] += sample["pss"]
    out = {role: {"processes": len({s["pid"] for s in rows}), "peak_rss_mb": round(max(s["rss"] for s in rows), 1),
                  "peak_uss_mb": round(max(s["uss"] for s in rows), 1),
                  "peak_rss_sum_mb": round(max(summed[role].values()), 1)} for role, rows in by_role.items()}
    out["all (sum of PSS)"] = {"processes": len({s["pid"] for s in samples}),
                               "peak_pss_sum_mb": round(max(total_pss.values(), default=0.0), 1)}
    return out


def run_evaluation(workdir: Path, model: Path, max_images: int | None, interval: float) -> dict:
    """``jobs/evaluate.py`` on the set with its process tree sampled; its figures, and its timeline on disk."""
    label = f"{max_images or 'all'}"
    output, log_path = workdir / f"result-{label}.json", workdir / f"job-{label}.log"
    command = [sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--model", str(model), "--data", str(workdir),
               "--task", "zeroshot", "--no-mlflow", "--output", str(output)]
    if max_images:
        command += ["--max-images", str(max_images)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | JOB_ENV
    for attempt in range(1, STARTUP_ATTEMPTS + 1):
        output.unlink(missing_ok=True)
        started = time.monotonic()
        with open(log_path, "w") as log:
            job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            sampler = TreeSampler(job.pid, interval)
            sampler.start()
            code = job.wait()
            sampler.stop_event.set()
            sampler.join()
        wall = time.monotonic() - started
        log_text = log_path.read_text()
        if code == 0 or STARTUP_TIMEOUT not in log_text or attempt == STARTUP_ATTEMPTS:
            break
        print(f"{label}: Ray's node timed out during startup (attempt {attempt}; a loaded machine); retrying in 30 s")
        time.sleep(30)
    if code != 0:
        raise SystemExit(f"{' '.join(command)} exited {code}; its log: {log_path}\n{log_text[-3000:]}")
    with open(workdir / f"timeline-{label}.jsonl", "w") as handle:
        handle.writelines(json.dumps(sample) + "\n" for sample in sampler.samples)
    result = json.loads(output.read_text())["results"][0]
    rate = RATE_LINE.findall(log_text)
    images, stream_s, rate_per_s = (int(rate[-1][0]), float(rate[-1][1]), int(rate[-1][2])) if rate else (None, None, None)
    roles = peaks_by_role(sampler.samples)
    if "raylet" not in sampler.daemons:
        print(f"warning: no raylet in the driver's process tree ({label}): did it join another cluster?")
    return {"max_images": max_images, "images": result["images"], "bad_samples": result["bad_samples"],
            "top1": round(result["metrics"]["zeroshot_top1"], 5), "wall_s": round(wall, 1),
            "task_s": result["details"].get("seconds"), "stream_images": images, "stream_s": stream_s,
            "images_per_s": rate_per_s, "attempts": attempt, "samples": len(sampler.samples),
            "daemons": sorted(sampler.daemons), "roles": roles,
            "titles": {role: sorted(titles) for role, titles in sampler.titles.items() if role != "ray daemons"}}


def print_table(small: dict, large: dict) -> None:
    print(f"{'role':18s} {'procs':>5s} | {'peak RSS':>9s} {'peak RSS':>9s} {'ratio':>6s} | {'peak USS':>9s} "
          f"{'peak USS':>9s} {'ratio':>6s} | {'sum RSS':>8s} {'sum RSS':>8s}")
    print(f"{'':18s} {'':>5s} | {small['images']:>8d}  {large['images']:>8d}  {'':>6s} | {small['images']:>8d}  "
          f"{large['images']:>8d}  {'':>6s} | {small['images']:>7d}  {large['images']:>7d}")
    for role in ROLES:
        a, b = small["roles"].get(role), large["roles"].get(role)
        if not a or not b:
            print(f"{role:18s} (seen only at {'%d' % small['images'] if a else '%d' % large['images'] if b else 'neither'})")
            continue
        print(f"{role:18s} {b['processes']:5d} | {a['peak_rss_mb']:7.0f}MB {b['peak_rss_mb']:7.0f}MB "
              f"{b['peak_rss_mb'] / a['peak_rss_mb']:5.2f}x | {a['peak_uss_mb']:7.0f}MB {b['peak_uss_mb']:7.0f}MB "
              f"{b['peak_uss_mb'] / max(a['peak_uss_mb'], 0.1):5.2f}x | {a['peak_rss_sum_mb']:6.0f}MB "
              f"{b['peak_rss_sum_mb']:6.0f}MB")
    a, b = small["roles"]["all (sum of PSS)"], large["roles"]["all (sum of PSS)"]
    print(f"{'all (sum of PSS)':18s} {b['processes']:5d} | {a['peak_pss_sum_mb']:7.0f}MB {b['peak_pss_sum_mb']:7.0f}MB "
          f"{b['peak_pss_sum_mb'] / a['peak_pss_sum_mb']:5.2f}x")
    for run in (small, large):
        print(f"{run['images']:>6d} images: wall {run['wall_s']:.0f} s, zero-shot task {run['task_s']} s, image stream "
              f"{run['stream_s']} s at {run['images_per_s']} images/s, bad samples {run['bad_samples'] or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "rayclip-eval-memory"))
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--shards", type=int, default=50)
    parser.add_argument("--baseline-images", type=int, default=5_000)
    parser.add_argument("--templates", type=int, default=4, help="prompt templates per class (the paper's first N)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "eval_memory.jsonl"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    layout = write_set(workdir, images=args.images, shards=args.shards, templates=args.templates)
    set_mb = layout["bytes_on_disk"] / 2**20
    how = "reused" if layout["reused"] else f"written in {layout['written_s']:.0f} s"
    print(f"set: {args.images} images in {args.shards} shards, {set_mb:.0f} MB on disk at {workdir} ({how}; "
          f"mean JPEG {np.mean(layout['jpeg_sizes']) / 1024:.1f} KB)")
    model = workdir / "vit-tiny.pt"
    save_model(model)
    small = run_evaluation(workdir, model, args.baseline_images, args.interval)
    large = run_evaluation(workdir, model, None, args.interval)
    for run, want in ((small, args.baseline_images), (large, args.images)):
        if run["images"] != want:
            raise SystemExit(f"evaluated {run['images']} images, expected {want} (bad: {run['bad_samples']})")
    print_table(small, large)
    whole = {n: whole_set_cost_mb(layout, n, 32) for n in (args.baseline_images, args.images)}
    for n, cost in whole.items():
        print(f"holding {n} images whole: {cost['jpeg_mb']:.0f} MB of JPEG, decoded uint8 {cost['decoded_native_mb']:.0f} MB "
              f"native / {cost['decoded_32px_mb']:.0f} MB at 32 px / {cost['decoded_224px_mb']:.0f} MB at 224 px")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as handle:
            handle.write(json.dumps({"benchmark": "eval_memory", "cpus": os.cpu_count(), "model": "ViT-tiny",
                                     "set_mb": round(set_mb, 1), "shards": args.shards, "templates": args.templates,
                                     "interval_s": args.interval, "baseline": small, "full": large,
                                     "whole_set_cost": whole}) + "\n")


if __name__ == "__main__":
    main()
