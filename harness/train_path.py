"""The training worker's own code on one device, without Ray: what the GPU check runs and the suite dry-runs.

``orchestrator.train.worker_loop`` runs inside Ray Train, whose wheel is too large for the GPU check machine;
:func:`run_checks` drives the same functions directly (``build_engine``, ``optimizer_step``, ``evaluate``,
``write_export``) on the run config given, in one process (a world of one):

1. ``steps``: the config's engine (bf16 autocast, ZeRO stage, gradient checkpointing) trains on one
   fixed batch of channels-last uint8 images, as the data stream ships them; the loss must fall.
2. ``eval``: the in-loop evaluation (``worker_loop.evaluate`` on an image-folder set written from the
   batch) under the engine's autocast must evaluate every image, and the bare module's image features
   under autocast must match fp32 to bf16 precision.
3. ``export``: the OpenAI-layout export (fp32 master weights) loaded into a fresh model must give the
   engine's fp32 features.
4. ``compile`` (``compile_model``, a smaller model): ``model.compile=true`` trains like eager.

``benchmarks/gpu_train_path.py`` is its command line (on a GPU); ``tests/integration/test_gpu_check_dry_run.py``
runs it with ``device="cpu"`` on ViT-tiny so that a change to those functions cannot break it silently.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import torch

from models import CLIP, channels_last_batch_to_model, get_tokenizer
from orchestrator.config import EvalSetConfig, RunConfig, load_config
from orchestrator.eval import InLoopEvaluation
from orchestrator.train import TrainState, Worker, build_engine, build_model, evaluate, optimizer_step, write_export


class PrintingTracker:
    """Stands in for MLflow (not what these checks are about): keeps what rank 0 would log."""

    def __init__(self) -> None:
        self.logged: list[tuple] = []

    def log_evaluation(self, result, step, extra_metrics=None) -> None:
        self.logged.append((step, result.set_name, result.metrics))


def emit(record: dict, path: str | None) -> None:
    """Print ``record`` as one JSON line, and append it to ``path`` when given."""
    line = json.dumps(record)
    print(line, flush=True)
    if path:
        with open(path, "a") as handle:
            handle.write(line + "\n")


def synthetic_batch(cfg: RunConfig, batch: int, device: torch.device):
    """Channels-last uint8 images (B, R, R, 3), as the stream ships them, and captions naming 8 classes."""
    size = cfg.model.spec().vision.image_size
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(batch) % 8
    base = torch.randint(0, 256, (8, 1, 1, 3), generator=generator, dtype=torch.uint8)  # a colour per class
    noise = torch.randint(0, 40, (batch, size, size, 3), generator=generator, dtype=torch.uint8)
    images = (base[labels].expand(-1, size, size, -1) // 2 + noise).to(device)
    names = [f"colour {index}" for index in range(8)]
    tokens = get_tokenizer(context_length=cfg.model.spec().text.context_length)(
        [f"a photo of {names[label]}." for label in labels.tolist()]).to(device)
    return images, tokens, labels, names


def build_worker(cfg: RunConfig) -> Worker:
    """The worker's engine and loss (``loss.kind``), with ``model.patch_dropout`` on as the loop sets it in training."""
    engine = build_engine(cfg, build_model(cfg), world_size=1)
    engine.module.set_patch_dropout(cfg.model.patch_dropout)
    return Worker(cfg, rank=0, world_size=1, engine=engine, state=TrainState(), tracker=PrintingTracker())


def check_steps(worker: Worker, images, tokens, steps: int) -> dict:
    pixels = channels_last_batch_to_model(images, worker.dtype)
    losses, started = [], None
    for step in range(steps):
        if step == 2:  # first steps: allocator warm-up, cuDNN/cuBLAS heuristics
            if pixels.is_cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        result = optimizer_step(worker, pixels, tokens)
        losses.append(float(result.loss))  # (a host sync every step)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if pixels.is_cuda else 0.0
    return {"check": "steps", "ok": losses[-1] < losses[0] and all(math.isfinite(loss) for loss in losses),
            "losses": [round(x, 4) for x in losses], "samples_per_s": round(len(images) * (steps - 2) / seconds, 1),
            "peak_mem_gib": round(peak, 2)}


def check_eval(worker: Worker, images, labels, names) -> dict:
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        for row, (image, label) in enumerate(zip(images.cpu().numpy(), labels.tolist())):
            os.makedirs(f"{folder}/{label:02d}", exist_ok=True)
            Image.fromarray(image).save(f"{folder}/{label:02d}/{row:05d}.png")
        with open(f"{folder}/classnames.txt", "w") as handle:
            handle.write("\n".join(names[: int(labels.max()) + 1]) + "\n")
        set_cfg = EvalSetConfig(name="synthetic", data=folder, templates=["a photo of {}."])
        eval_cfg = worker.cfg.eval.model_copy(update={"sets": [set_cfg], "heldout": False})
        worker.evaluation = InLoopEvaluation(worker.cfg.model_copy(update={"eval": eval_cfg}))
        result = evaluate(worker, final=True)[0]
    module = worker.engine.module
    pixels = channels_last_batch_to_model(images[:16], torch.float32)
    with torch.no_grad():
        reference = torch.nn.functional.normalize(module.encode_image(pixels).float(), dim=-1)
        with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=worker.cfg.precision == "bf16"):
            autocast = torch.nn.functional.normalize(module.encode_image(pixels).float(), dim=-1)
    cosine = float((reference * autocast).sum(-1).min())
    top1 = result.metrics["zeroshot_top1"]
    return {"check": "eval", "ok": result.images == len(labels) and math.isfinite(top1) and cosine > 0.99
            and bool(worker.tracker.logged), "top1": top1, "top5": result.metrics["zeroshot_top5"],
            "images": result.images, "min_cosine_autocast_vs_fp32": round(cosine, 5)}


def check_export(worker: Worker, images) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        path = write_export(worker, scratch)
        state_dict = torch.load(path, map_location="cpu")
    fresh = CLIP(worker.engine.module.spec)
    fresh.load_openai_state_dict(state_dict)
    fresh.to(images.device).eval()
    module = worker.engine.module.eval()
    pixels = channels_last_batch_to_model(images[:8], torch.float32)
    with torch.no_grad():
        ours, theirs = module.encode_image(pixels).float(), fresh.encode_image(pixels).float()
    difference = float((ours - theirs).abs().max())
    return {"check": "export", "ok": difference < 1e-3 * float(ours.abs().max()), "max_abs_diff": difference,
            "tensors": len(state_dict)}


def check_compile(cfg: RunConfig, batch: int, device: torch.device) -> dict:
    runs = {}  # compiled? -> (steps record, seconds including compilation)
    for compiled in (False, True):
        run = RunConfig.from_dict({**cfg.model_dump(), "model": {**cfg.model.model_dump(), "compile": compiled}})
        worker = build_worker(run)
        images, tokens, _, _ = synthetic_batch(run, batch, device)
        started = time.perf_counter()
        record = check_steps(worker, images, tokens, steps=8)
        runs[compiled] = record, round(time.perf_counter() - started, 1)
        del worker
    (eager, eager_s), (compiled, compiled_s) = runs[False], runs[True]
    close = all(abs(a - b) < 0.05 * max(1.0, abs(b)) for a, b in zip(compiled["losses"], eager["losses"]))
    return {"check": "compile", "model": cfg.model.name, "ok": close and compiled["ok"],
            "eager_losses": eager["losses"], "compiled_losses": compiled["losses"],
            "eager_samples_per_s": eager["samples_per_s"], "compiled_samples_per_s": compiled["samples_per_s"],
            "eager_s": eager_s, "compiled_s_incl_compile": compiled_s}


def run_checks(config: str, overrides: list[str], *, micro_batch: int = 32, steps: int = 8,
               compile_model: str | None = None, device: str = "cuda", json_path: str | None = None) -> list[dict]:
    """Run every check on ``config`` with ``overrides`` (``section.field=value``) in this process.

    Joins a one-process DeepSpeed group (nccl on CUDA, else gloo; it outlives the call, so run this in a
    process of its own). Each record is printed as one JSON line (and appended to ``json_path``) and
    returned, the ``setup`` record first; every other record carries ``ok``.
    """
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    target = torch.device(device)
    # A short warmup, so the few steps here move the loss (the paper's 2,000 would keep the lr near 0).
    overrides = [f"deepspeed.micro_batch_size={micro_batch}", "deepspeed.grad_accum_steps=1",
                 "scaling.num_workers=1", "schedule.warmup_steps=3", *overrides]
    cfg = load_config(config, overrides)
    name = torch.cuda.get_device_name() if target.type == "cuda" else "cpu"
    records = [{"check": "setup", "device": name, "model": cfg.model.name, "precision": cfg.precision,
                "zero_stage": cfg.deepspeed.zero_stage, "grad_checkpointing": cfg.model.grad_checkpointing,
                "micro_batch": micro_batch, "torch": torch.__version__, "deepspeed": deepspeed.__version__}]
    emit(records[-1], json_path)
    worker = build_worker(cfg)
    images, tokens, labels, names = synthetic_batch(cfg, micro_batch, target)
    records.append(check_steps(worker, images, tokens, steps))
    emit(records[-1], json_path)
    records.append(check_eval(worker, images, labels, names))
    emit(records[-1], json_path)
    records.append(check_export(worker, images))
    emit(records[-1], json_path)
    del worker
    if compile_model:
        small = load_config(config, [*overrides, f"model.name={compile_model}", "model.grad_checkpointing=false"])
        records.append(check_compile(small, micro_batch, target))
        emit(records[-1], json_path)
    return records


def failed_checks(records: list[dict]) -> list[str]:
    """The names of the checks in ``records`` that did not pass."""
    return [record["check"] for record in records if not record.get("ok", True)]
