"""ViT-L/14 and RN50x64 training steps in bf16 under DeepSpeed ZeRO on one GPU: samples/s, MFU, peak memory.

Runs torch + DeepSpeed in one process without Ray (the GPU machines have no Ray), with the same model code,
loss and weight-decay groups as the Ray Train workers. A step is forward, ClipLoss, backward, gradient
clipping and a fused AdamW update on fp32 master weights (DeepSpeed bf16). MFU counts model FLOPs only:
3 x forward FLOPs of the image tower at its resolution plus the text tower at the captions' actual length
(gradient checkpointing's recomputation is not counted), against the GPU's dense bf16 peak. With FLIP's
``--patch-dropout`` the image tower's FLOPs are counted on the tokens it keeps (the work actually done);
``--loss siglip`` trains with SigLIP's sigmoid loss and learnable bias instead of CLIP's.

A golden check rides along: over the timed steps on one fixed batch the loss must fall (an engine that
does not learn fails loudly, whatever its speed).

    python benchmarks/gpu_step.py                                # both models, ZeRO-1, 10 timed steps
    python benchmarks/gpu_step.py --models ViT-L/14 --batch 256 --compile
    python benchmarks/gpu_step.py --models ViT-L/14 --patch-dropout 0.5     # FLIP: half the patch tokens
    python benchmarks/gpu_step.py --models ViT-L/14 --loss siglip
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from models import CLIP, ClipLoss, SigLipLoss, get_model_spec, siglip_spec, weight_decay_groups
from models.flops import forward_flops

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
DEFAULT_BATCH = {"ViT-L/14": 128, "RN50x64": 32, "ViT-B/32": 512, "RN50": 256}
CAPTION_TOKENS = 20  # typical web caption incl. [SOS]/[EOS]; the text tower stops at the longest


def peak_flops(device_name: str, override: float | None) -> float:
    if override:
        return override * 1e12
    for key, value in PEAK_BF16.items():
        if key in device_name:
            return value
    raise SystemExit(f"unknown GPU {device_name!r}: pass --peak-tflops")


def init_single_process_group() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl")


def build_model_and_optimizer(name: str, args):
    torch.manual_seed(0)
    spec = siglip_spec(get_model_spec(name)) if args.loss == "siglip" else get_model_spec(name)
    with torch.device("cuda"):  # initialise on the GPU: seconds instead of a minute of CPU randn for RN50x64
        model = CLIP(spec)
    model.set_patch_dropout(args.patch_dropout)  # training mode only, as in the worker
    if args.checkpointing:
        model.set_grad_checkpointing(vision=True, text=True)
    vit = get_model_spec(name).vision.kind == "vit"
    betas, eps = ((0.9, 0.98), 1e-6) if vit else ((0.9, 0.999), 1e-8)  # the paper's per-tower AdamW settings
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.2), lr=1e-4, betas=betas, eps=eps, fused=True)
    return model, optimizer


def deepspeed_step(name: str, batch: int, args):
    """One training step through a DeepSpeed engine: bf16 weights, fp32 master copy, ZeRO partitioning."""
    import deepspeed

    model, optimizer = build_model_and_optimizer(name, args)
    config = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.zero_stage},
        "steps_per_print": 10**9,
    }
    if args.precision == "bf16":
        config["bf16"] = {"enabled": True}
    else:  # fp32 weights, the forward under torch.autocast; our fused-QKV attention's weights communicate in bf16 too
        safe = ["torch.nn.modules.linear.Linear", "torch.nn.modules.conv.Conv2d", "models.transformer.SelfAttention"]
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": safe}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if args.compile:
        engine.compile()
    loss_fn = make_loss(args)

    def step(images, tokens):
        if args.precision == "autocast":
            images = images.float()
        loss = loss_fn(*(output.float() for output in engine(images, tokens)))
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step


def plain_step(name: str, batch: int, args):
    """The same step without DeepSpeed (fp32 weights, bf16 autocast): the baseline for DeepSpeed's overhead."""
    model, optimizer = build_model_and_optimizer(name, args)
    forward = torch.compile(model) if args.compile else model
    loss_fn = make_loss(args)

    def step(images, tokens):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs = forward(images.float(), tokens)
        loss = loss_fn(*(output.float() for output in outputs))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        return loss.detach()

    return step


def make_loss(args):
    """CLIP's softmax loss, or SigLIP's sigmoid loss (the model then also returns its bias)."""
    return SigLipLoss() if args.loss == "siglip" else ClipLoss()


def print_profile(step, images, tokens) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step(images, tokens)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60), flush=True)


def synthetic_batch(name: str, batch: int):
    resolution = get_model_spec(name).vision.image_size
    generator = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randn(batch, 3, resolution, resolution, device="cuda", generator=generator).bfloat16()
    tokens = torch.zeros(batch, 77, dtype=torch.long, device="cuda")
    tokens[:, 0] = 49406
    tokens[:, 1 : CAPTION_TOKENS - 1] = torch.randint(1, 49000, (batch, CAPTION_TOKENS - 2), device="cuda")
    tokens[:, CAPTION_TOKENS - 1] = 49407
    return images, tokens


def train_flops_per_sample(name: str, patch_dropout: float = 0.0) -> float:
    image, _ = forward_flops(get_model_spec(name), patch_dropout=patch_dropout)
    _, text = forward_flops(get_model_spec(name, context_length=CAPTION_TOKENS))
    return 3.0 * (image + text)


def measure(name: str, args, peak: float) -> dict:
    batch = args.batch or DEFAULT_BATCH[name]
    train_step = (plain_step if args.plain else deepspeed_step)(name, batch, args)
    images, tokens = synthetic_batch(name, batch)

    def step():
        return train_step(images, tokens)

    torch.cuda.reset_peak_memory_stats()
    warmup_start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - warmup_start
    losses = []
    start = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    losses = [float(x) for x in losses]
    samples_per_s = batch / seconds
    result = {
        "model": name,
        "batch": batch,
        "zero_stage": args.zero_stage,
        "grad_checkpointing": args.checkpointing,
        "compile": args.compile,
        "deepspeed": not args.plain,
        "precision": "autocast" if args.plain else args.precision,
        "patch_dropout": args.patch_dropout,
        "loss": args.loss,
        "step_s": round(seconds, 4),
        "samples_per_s": round(samples_per_s, 1),
        "mfu": round(samples_per_s * train_flops_per_sample(name, args.patch_dropout) / peak, 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "warmup_s": round(warmup_s, 1),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
    }
    if args.profile:
        print_profile(train_step, images, tokens)
    train_step = step = None  # free the engine before empty_cache
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-L/14", "RN50x64"])
    parser.add_argument("--batch", type=int, default=None, help="per-GPU micro-batch (default per model)")
    parser.add_argument("--zero-stage", type=int, default=1, choices=(1, 2, 3))
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both towers")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model inside the engine")
    parser.add_argument(
        "--precision", default="autocast", choices=("bf16", "autocast"),
        help="DeepSpeed torch_autocast (fp32 weights, bf16 compute; what training uses) or DeepSpeed bf16 "
        "(bf16 weights, fp32 master copy: 1.54x slower on ViT-L/14 here)",
    )
    parser.add_argument("--patch-dropout", type=float, default=0.0, help="FLIP's share of patch tokens dropped (ViTs)")
    parser.add_argument("--loss", default="clip", choices=("clip", "siglip"))
    parser.add_argument("--plain", action="store_true", help="baseline without DeepSpeed: autocast bf16 + fused AdamW")
    parser.add_argument("--profile", action="store_true", help="print the 15 costliest GPU ops of two steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also append results as JSON lines here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_step.py needs a CUDA GPU (scripts/gpu_check.sh runs it on a GPU machine)")
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.cuda.get_device_name()
    peak = peak_flops(device, args.peak_tflops)
    print(f"{device}, torch {torch.__version__}, peak bf16 {peak / 1e12:.0f} TFLOP/s", flush=True)
    if not args.plain:
        init_single_process_group()
    failed = []
    for name in args.models:
        try:
            result = measure(name, args, peak)
        except torch.cuda.OutOfMemoryError as error:
            failed.append(f"{name}: out of memory at batch {args.batch or DEFAULT_BATCH[name]} ({error})")
            torch.cuda.empty_cache()
            continue
        print(json.dumps(result), flush=True)
        if args.json:
            with args.json.open("a") as out:
                out.write(json.dumps({"device": device, **result}) + "\n")
        if not result["loss_last"] < result["loss_first"]:
            failed.append(f"{name}: loss did not fall over {args.steps} steps on a fixed batch")
    if failed:
        raise SystemExit("; ".join(failed))


if __name__ == "__main__":
    main()
