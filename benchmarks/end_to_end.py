"""Command to result: rayclip's default pretraining run against open_clip's own trainer, both in this run.

    bash scripts/install_open_clip_train.sh      # once: open_clip_train's venv
    python benchmarks/end_to_end.py [--steps 600] [--shards data/fashion-mnist] [--skip-rayclip | --skip-open-clip]
                                    [--open-clip-workers 1] [--transcripts DIR]
                                    [--json [benchmarks/results/end_to_end.jsonl]]

Runs the two commands one after the other, rayclip first (2 cores: never side by side), on the Fashion-MNIST
shards of the demo (made here when missing):

* rayclip: ``python jobs/pretrain.py`` with configs/local.yaml: ViT-tiny, 2 Ray Train workers, DeepSpeed
  ZeRO-1 on CPU, global batch 256, AdamW, warmup then cosine; 10,000 held-out images evaluated and a
  checkpoint saved at a third, two thirds and the end; the model exported and registered in MLflow.
* open_clip: ``torchrun --nproc_per_node 2`` of ``open_clip_train.main`` in its own venv, on the same tars,
  with everything taken from the same rayclip config: an open_clip config of the same ViT-tiny (parameter
  counts checked equal), the same steps (``--train-num-samples`` = steps x 256, one epoch), batch per
  process, AdamW lr / betas / eps / weight decay, warmup, cosine, gradient clipping, seed and loss (each rank
  scores its rows against the gathered batch: ``--local-loss --gather-with-grad``, rayclip's ``ClipLoss``);
  fp32 and gloo like rayclip on CPU; one thread per process (``OMP_NUM_THREADS`` unless set: Ray's rule for
  its one-CPU workers); one data-loader process per rank (``--workers 1``), like the decode process rayclip
  runs beside its workers (``--workers 0`` would decode inside each step, 4 would put 10 processes on 2
  cores). It evaluates nothing and saves one checkpoint, at the end.

Each output line is timestamped as it arrives. Per side: seconds from the command to its first step line (for
rayclip, as Ray forwards it to the driver's output) and to its exit, and the steady rate: the median, over
logging windows (``tracking.log_every_steps``, 10 steps), of the rate each trainer measures itself for its
window (rayclip's samples/s, open_clip's 256 / its mean ``Batch (t)``; both are wall time per step on rank 0,
data waits included), leaving out the windows that start in the first ten steps (start-up) and rayclip's
windows that hold an evaluation or a checkpoint. Ratios: rayclip / open_clip for the steady rate,
open_clip / rayclip for the whole command.

Where the two runs differ, and why it is left so:

* open_clip_train 3.3.0 wraps the model in DistributedDataParallel with ``device_ids=[device]``, which torch
  refuses for a CPU module, and no flag avoids it. ``--open-clip-child``, the entry point torchrun runs,
  drops device ids that name the CPU; that and registering the model config is all it does, and no file of
  open_clip's is changed. Its flags travel in a JSON file because torchrun's own parser rejects ``--logs``
  anywhere on its command line (an ambiguous prefix of its ``--logs-specs``).
* Weight decay: open_clip exempts tensors under 2-D, norms, biases and the logit scale; rayclip also exempts
  the token, positional and class embeddings, as the paper does. Same optimizer work either way.
* rayclip's text tower runs on the batch's longest caption, open_clip's on all 77 positions: part of what
  is measured (exact under the causal mask, see ``models.clip.CLIP.encode_text``).
* Both crop 90-100% of the 28 px image and resize it to 32 px, each with its own transform code.

``--steps N`` shortens both sides alike: evaluations and checkpoints every N // 3 steps, warmup 50 x N / 600,
logging every N // 60 steps (at least 1), so a 30-step check still has windows clear of start-up and pauses.
Such a check proves that both sides run and parse, not their speed: logging every step costs rayclip a
collective and an MLflow write per step, and a 2-step warmup at lr 3e-3 collapses both to loss ln 256.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models import ModelSpec
    from orchestrator.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "end_to_end.jsonl"
VENV = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rayclip" / "open-clip-train-venv"
DEFAULT_STEPS = 600
DEFAULT_WARMUP = 50
STARTUP_STEPS = 10
OPEN_CLIP_MODEL = "rayclip-ViT-tiny"  # the name its config file registers in open_clip
RAYCLIP_EVAL = re.compile(r"\[rayclip\] step (\d+): .* \(\d+ images.*, ([\d.]+) s\)")
RAYCLIP_STEP = re.compile(r"\[rayclip\].*\bstep (\d+)/\d+ loss \S+ lr \S+(?: ([\d.]+) samples/s)?")
OPEN_CLIP_STEP = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ \(\d+%\)\] Data \(t\): [\d.]+ Batch \(t\): ([\d.]+),")


@dataclass
class Side:
    """One trainer's command and what its timestamped output showed."""

    command: list[str]
    first_step_s: float = float("nan")
    command_s: float = float("nan")
    windows: list[tuple[int, int, float]] = field(default_factory=list)
    """(first step, last step, samples/s) of each logging window, as the trainer measured it."""
    steady_samples_per_s: float = float("nan")
    steady_windows: int = 0
    evaluations: dict[int, float] = field(default_factory=dict)
    """Step -> seconds each in-loop evaluation held training, as the rayclip job reports it."""


def job_overrides(shards: Path, steps: int) -> list[str]:
    """``--set`` values of the rayclip job: the default config, shortened alike on both sides by ``--steps``."""
    third = steps // 3
    return [f"data.shards={shards}", f"schedule.total_steps={steps}",
            f"schedule.warmup_steps={max(1, DEFAULT_WARMUP * steps // DEFAULT_STEPS)}",
            f"eval.every_steps={third}", f"checkpoint.every_steps={third}",
            f"tracking.log_every_steps={max(1, steps // 60)}"]


def open_clip_model_config(spec: ModelSpec) -> dict:
    """An open_clip model config of the same architecture as rayclip's ``ModelSpec``."""
    vision, text = spec.vision, spec.text
    if vision.kind != "vit":
        raise SystemExit(f"{spec.name}: only a ViT image tower is translated to open_clip here")
    return {
        "embed_dim": spec.embed_dim,
        "quick_gelu": spec.quick_gelu,
        "vision_cfg": {"image_size": vision.image_size, "layers": vision.layers, "width": vision.width,
                       "head_width": vision.width // vision.heads, "patch_size": vision.patch_size,
                       "mlp_ratio": 4.0},  # models.transformer's MLP is 4 x width wide
        "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
                     "heads": text.heads, "layers": text.layers},
    }


def parameter_counts(spec: ModelSpec, model_config: Path) -> tuple[int, int]:
    """(rayclip's, open_clip's) parameter count of the benchmarked model."""
    import open_clip

    from models import create_model

    open_clip.add_model_config(model_config)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    return count(create_model(spec.name)), count(open_clip.create_model(OPEN_CLIP_MODEL))


def shard_pattern(shards: Path) -> str:
    """The tars of ``shards`` as one brace pattern, checked to name exactly those files."""
    import braceexpand

    tars = sorted(shards.glob("*.tar"))
    if not tars:
        raise SystemExit(f"no .tar shards in {shards}")
    pattern = f"{shards}/{{{tars[0].stem}..{tars[-1].stem}}}.tar"
    if list(braceexpand.braceexpand(pattern)) != [str(t) for t in tars]:
        raise SystemExit(f"the shards in {shards} are not numbered contiguously; {pattern} does not name them")
    return pattern


def open_clip_argv(cfg: RunConfig, pattern: str, logs: Path, workers: int) -> list[str]:
    """open_clip_train's flags for the run that ``cfg`` (the rayclip job's config) describes."""
    schedule, optim, deepspeed = cfg.schedule, cfg.optim, cfg.deepspeed
    if schedule.kind != "cosine" or schedule.min_lr_ratio or deepspeed.grad_accum_steps != 1:
        raise SystemExit("open_clip's run is only built for a cosine schedule to 0 without accumulation")
    (beta1, beta2), eps = cfg.adam_betas_eps()
    return ["--model", OPEN_CLIP_MODEL, "--train-data", pattern, "--dataset-type", "webdataset",
            "--train-num-samples", str(schedule.total_steps * cfg.global_batch_size),
            "--batch-size", str(deepspeed.micro_batch_size), "--epochs", "1", "--workers", str(workers),
            "--lr", str(optim.lr), "--wd", str(optim.weight_decay), "--beta1", str(beta1), "--beta2", str(beta2),
            "--eps", str(eps), "--warmup", str(schedule.warmup_steps), "--lr-scheduler", "cosine",
            "--grad-clip-norm", str(optim.grad_clip_norm), "--seed", str(cfg.seed), "--local-loss",
            "--gather-with-grad", "--precision", "fp32", "--device", "cpu", "--dist-backend", "gloo",
            "--log-every-n-steps", str(cfg.tracking.log_every_steps), "--report-to", "none",
            "--save-frequency", "1", "--zeroshot-frequency", "0", "--logs", str(logs), "--name", "end_to_end"]


def timed_run(side: Side, env: dict[str, str], cwd: Path, transcript: Path, on_line) -> None:
    """Run ``side.command``, timestamping each line for ``on_line(line, seconds)``; the exit time ends it."""
    print(" ".join(side.command), flush=True)
    started = time.monotonic()
    with open(transcript, "w") as log, subprocess.Popen(side.command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                                        stderr=subprocess.STDOUT, text=True) as job:
        for line in job.stdout:
            seconds = time.monotonic() - started
            log.write(f"{seconds:8.2f}s {line}")
            on_line(line, seconds)
    side.command_s = time.monotonic() - started
    if job.returncode != 0:
        tail = transcript.read_text().splitlines()[-40:]
        raise SystemExit("\n".join([*tail, f"{transcript.stem} failed (exit {job.returncode}); above, its last lines"]))


def run_rayclip(cfg: RunConfig, shards: Path, scratch: Path, transcripts: Path) -> Side:
    steps = cfg.schedule.total_steps
    side = Side([sys.executable, str(ROOT / "jobs" / "pretrain.py"),
                 *[arg for value in job_overrides(shards, steps) for arg in ("--set", value)]])
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "DS_ACCELERATOR": "cpu",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path.home() / ".cache" / "rayclip" / "torch_extensions"))}
    env.pop("RAYCLIP_HOME", None)  # outputs and mlflow.db go to the working directory, a temporary one
    previous = None

    def on_line(line: str, seconds: float) -> None:
        nonlocal previous
        evaluation = RAYCLIP_EVAL.search(line)
        if evaluation is not None:
            side.evaluations[int(evaluation.group(1))] = float(evaluation.group(2))
        match = RAYCLIP_STEP.search(line)
        if match is None:
            return
        step = int(match.group(1))
        if previous is None:
            side.first_step_s = seconds
        elif match.group(2) is not None:
            side.windows.append((previous + 1, step, float(match.group(2))))
        previous = step

    workdir = scratch / "rayclip"
    workdir.mkdir()
    timed_run(side, env, workdir, transcripts / "rayclip.log", on_line)
    pauses = {step for every in (cfg.eval.every_steps, cfg.checkpoint.every_steps) if every
              for step in range(every, steps, every)}
    steady_rate(side, pauses)
    return side


def run_open_clip(cfg: RunConfig, argv: list[str], model_config: Path, scratch: Path, transcripts: Path) -> Side:
    python = VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no venv at {VENV}: run `bash scripts/install_open_clip_train.sh` first")
    launch = scratch / "open_clip" / "launch.json"
    launch.write_text(json.dumps({"model_config": str(model_config), "argv": argv}, indent=2))
    print("open_clip_train flags: " + " ".join(argv), flush=True)
    side = Side([str(python), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                 str(cfg.scaling.num_workers), str(Path(__file__).resolve()), "--open-clip-child", str(launch)])
    # Ray's rule for its workers when unset: as many threads as the worker has CPUs
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, int(cfg.scaling.cpus_per_worker))))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    global_batch = cfg.global_batch_size
    previous = None

    def on_line(line: str, seconds: float) -> None:
        nonlocal previous
        match = OPEN_CLIP_STEP.search(line)
        if match is None:
            return
        step = int(match.group(1)) // global_batch
        if previous is None:
            side.first_step_s = seconds
        else:
            side.windows.append((previous + 1, step, global_batch / float(match.group(2))))
        previous = step

    timed_run(side, env, scratch / "open_clip", transcripts / "open_clip.log", on_line)
    steady_rate(side, set())  # no evaluation, no checkpoint before the end
    return side


def steady_rate(side: Side, pause_steps: set[int]) -> None:
    """Median samples/s of the windows that start after start-up and hold no pause (a pause follows its step)."""
    rates = [rate for first, last, rate in side.windows
             if first > STARTUP_STEPS and not any(first - 1 <= pause < last for pause in pause_steps)]
    side.steady_windows = len(rates)
    side.steady_samples_per_s = statistics.median(rates) if rates else float("nan")


def ensure_shards(shards: Path) -> None:
    if (shards / "manifest.json").exists():
        return
    print(f"making the demo's shards in {shards}", flush=True)
    subprocess.run([sys.executable, str(ROOT / "jobs" / "prepare_data.py"), "--input", "fashion-mnist",
                    "--output", str(shards), "--shard-size", "2000"], cwd=ROOT, check=True)


def report(sides: dict[str, Side]) -> dict[str, float]:
    print(f"{'':9s} {'first step':>12s} {'whole command':>14s} {'steady samples/s':>17s} {'windows':>8s}")
    for name, side in sides.items():
        print(f"{name:9s} {side.first_step_s:11.1f}s {side.command_s:13.1f}s {side.steady_samples_per_s:17.1f} "
              f"{side.steady_windows:8d}")
    if "rayclip" in sides and sides["rayclip"].evaluations:
        print("rayclip's evaluations held training for " + ", ".join(
            f"{seconds:.1f} s (step {step})" for step, seconds in sorted(sides["rayclip"].evaluations.items())))
    if len(sides) < 2:
        return {}
    ours, theirs = sides["rayclip"], sides["open_clip"]
    ratios = {"steady_rate_rayclip_over_open_clip": ours.steady_samples_per_s / theirs.steady_samples_per_s,
              "command_open_clip_over_rayclip": theirs.command_s / ours.command_s}
    print(f"steady samples/s, rayclip / open_clip: {ratios['steady_rate_rayclip_over_open_clip']:.2f}; "
          f"whole command, open_clip / rayclip: {ratios['command_open_clip_over_rayclip']:.2f}")
    return ratios


def run_open_clip_child(launch: Path) -> int:
    """What torchrun runs in the venv: register the model config, then open_clip_train's own ``main``."""
    import open_clip
    import torch
    from open_clip_train import main as trainer

    class CpuDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
        # open_clip_train passes device_ids=[device] on CPU too; torch accepts none for a CPU module.
        def __init__(self, module, device_ids=None, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids=device_ids, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDistributedDataParallel  # looked up by main at call time
    run = json.loads(launch.read_text())
    open_clip.add_model_config(run["model_config"])
    return 1 if trainer.main(run["argv"]) == -1 else 0  # main returns -1 when it refuses to start


def compare(args: argparse.Namespace) -> dict:
    """Both runs (or the one not skipped), the table, and the record ``--json`` appends."""
    from orchestrator.config import load_config

    shards = args.shards.resolve()
    ensure_shards(shards)
    cfg = load_config(None, job_overrides(shards, args.steps))
    spec = cfg.model.spec()
    sides: dict[str, Side] = {}
    with tempfile.TemporaryDirectory(prefix="rayclip-end-to-end-") as scratch_dir:
        scratch = Path(scratch_dir)
        transcripts = args.transcripts or scratch
        transcripts.mkdir(parents=True, exist_ok=True)
        (scratch / "open_clip").mkdir()
        model_config = scratch / "open_clip" / f"{OPEN_CLIP_MODEL}.json"
        model_config.write_text(json.dumps(open_clip_model_config(spec), indent=2))
        counts = parameter_counts(spec, model_config)
        print(f"{spec.name} parameters: rayclip {counts[0]:,}, open_clip {counts[1]:,}")
        if counts[0] != counts[1]:
            raise SystemExit("the open_clip config does not build the same model")
        argv = open_clip_argv(cfg, shard_pattern(shards), scratch / "open_clip" / "logs", args.open_clip_workers)
        if not args.skip_rayclip:
            sides["rayclip"] = run_rayclip(cfg, shards, scratch, transcripts)
        if not args.skip_open_clip:
            sides["open_clip"] = run_open_clip(cfg, argv, model_config, scratch, transcripts)
    ratios = report(sides)
    return {"benchmark": "end_to_end", "cpus": os.cpu_count(), "steps": args.steps, "model": spec.name,
            "parameters": counts[0], "global_batch": cfg.global_batch_size, "open_clip_workers": args.open_clip_workers,
            **{name: asdict(side) for name, side in sides.items()}, **ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps on both sides")
    parser.add_argument("--shards", type=Path, default=ROOT / "data" / "fashion-mnist")
    parser.add_argument("--skip-rayclip", action="store_true")
    parser.add_argument("--skip-open-clip", action="store_true")
    parser.add_argument("--open-clip-workers", type=int, default=1, help="open_clip's data-loader processes per rank")
    parser.add_argument("--transcripts", type=Path, help="keep each side's timestamped output here")
    parser.add_argument("--json", nargs="?", const=str(RESULTS), default=None,
                        help=f"append the result as a JSON line (to {RESULTS.relative_to(ROOT)} without a path)")
    parser.add_argument("--open-clip-child", type=Path, help=argparse.SUPPRESS)  # torchrun's entry, a launch.json
    args = parser.parse_args()
    if args.open_clip_child:
        sys.exit(run_open_clip_child(args.open_clip_child))
    if args.steps < 30:
        parser.error("--steps must be at least 30: three evaluations and windows clear of start-up")
    record = compare(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
