"""Samples/s of one CLIP training step: rayclip vs open_clip, then what the pretraining recipes change.

(1) rayclip vs open_clip, same architecture, batch and threads. A step is forward, contrastive loss,
    backward and an AdamW update. Baseline: open_clip's model of the same architecture (QuickGELU
    variants, as OpenAI's), open_clip's ClipLoss and ``torch.optim.AdamW`` with its defaults, as open_clip's
    training script builds it. Ours: ``models.create_model`` + ``models.ClipLoss`` + AdamW with
    ``fused=True``. Both see the same images and the same token ids of real captions.
(2) FLIP's patch dropout: the same rayclip ViT-B/16 training step (AdamW update included) with
    ``patch_dropout`` 0.5 against 0, switched per step on one model; the image tower runs on 1 + 98 tokens
    instead of 1 + 196. Baseline: the step without dropout.
(3) SigLIP's loss at a large local batch: forward + backward of :class:`models.SigLipLoss` against
    :class:`models.ClipLoss` on the same random L2-normalised features (what the loss adds to a step; the
    towers are the same under both). Baseline: CLIP's loss.

Contenders' steps alternate so that load from other processes on this shared machine hits both alike; the
ratio of medians is printed.

    python benchmarks/train_step.py                 # all three: ViT-B/32 b16, RN50 b8; ViT-B/16 b8; loss 4096 x 512
    python benchmarks/train_step.py --steps 5 --models ViT-B/32 --parts open_clip
    python benchmarks/train_step.py --parts patch_dropout siglip --loss-batch 8192
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from models import ClipLoss, SigLipLoss, create_model, get_tokenizer

OPEN_CLIP_NAMES = {"ViT-B/32": "ViT-B-32-quickgelu", "RN50": "RN50-quickgelu", "ViT-B/16": "ViT-B-16-quickgelu"}
DEFAULT_BATCH = {"ViT-B/32": 16, "RN50": 8, "ViT-B/16": 8}


def real_captions(count: int) -> list[str]:
    """Tux Paint's one-line stamp descriptions (Debian tuxpaint-stamps-default), else fixed sample captions."""
    captions = [
        path.read_text(errors="replace").splitlines()[0].strip()
        for path in sorted(Path("/usr/share/tuxpaint/stamps").rglob("*.txt"))[: count * 4]
    ]
    captions = [c for c in captions if c] or [
        "A brown dog runs across a grassy field.",
        "Two people riding bicycles on a city street at dusk.",
        "A plate of pasta with tomato sauce and basil.",
    ]
    return [captions[i % len(captions)] for i in range(count)]


Step = Callable[[], None]


def alternate(contenders: dict[str, Step], steps: int) -> dict[str, float]:
    """Median seconds per call of each contender: one warm-up call each (allocator, first-call overheads),
    then the timed calls interleaved."""
    for step in contenders.values():
        step()
    times: dict[str, list[float]] = {key: [] for key in contenders}
    for _ in range(steps):
        for key, step in contenders.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def ours(name: str, model: torch.nn.Module | None = None):
    model = (model or create_model(name)).train()
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.2, fused=True)

    def step(images, tokens):
        loss = loss_fn(*model(images, tokens))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


class _RandomInitNotice(logging.Filter):
    """open_clip's notice that a model without pretrained weights is random: the point here, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


_RANDOM_INIT_NOTICE = _RandomInitNotice()


def open_clips(name: str):
    import open_clip
    from open_clip.loss import ClipLoss as OpenClipLoss

    logging.getLogger().addFilter(_RANDOM_INIT_NOTICE)  # open_clip logs it on the root logger (added once)
    model = open_clip.create_model(OPEN_CLIP_NAMES[name], pretrained=None).train()
    loss_fn = OpenClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.2)

    def step(images, tokens):
        image_features, text_features, logit_scale = model(images, tokens)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def batch_of(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(batch, 3, 224, 224), get_tokenizer()(real_captions(batch))


def compare(name: str, batch: int, steps: int) -> float:
    """(1): rayclip's step over open_clip's on ``name``; prints both and returns the ratio."""
    images, tokens = batch_of(batch)
    longest = int((tokens != 0).sum(dim=1).max())
    steps_of = {"open_clip": open_clips(name), "rayclip": ours(name)}
    median = alternate({key: lambda step=step: step(images, tokens) for key, step in steps_of.items()}, steps)
    median = {"rayclip": median["rayclip"], "open_clip": median["open_clip"]}  # the contender first, as report reads
    return report(median, batch, steps, f"{name} batch {batch} (longest caption {longest} tokens of 77)")


def patch_dropout(batch: int, fraction: float, steps: int) -> float:
    """(2): the ViT-B/16 training step with patch dropout ``fraction`` over the same step without it."""
    images, tokens = batch_of(batch)
    model = create_model("ViT-B/16")
    step = ours("ViT-B/16", model)

    def with_share(share: float) -> Step:
        def run() -> None:
            model.set_patch_dropout(share)
            step(images, tokens)

        return run

    median = alternate({f"patch_dropout {fraction}": with_share(fraction), "patch_dropout 0": with_share(0.0)}, steps)
    return report(median, batch, steps, f"ViT-B/16 batch {batch} training step")


def siglip_loss(batch: int, dim: int, steps: int) -> float:
    """(3): forward + backward of SigLIP's loss over CLIP's on the same features, each at its paper's start."""
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).requires_grad_()
    clip_scale = torch.tensor(1 / 0.07, requires_grad=True)
    siglip_scale, siglip_bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    clip, siglip = ClipLoss(), SigLipLoss()
    median = alternate({"SigLipLoss": lambda: siglip(images, texts, siglip_scale, siglip_bias).backward(),
                        "ClipLoss": lambda: clip(images, texts, clip_scale).backward()}, steps)
    return report(median, batch, steps, f"loss forward+backward on {batch} x {dim} features")


def report(medians: dict[str, float], samples: int, steps: int, what: str) -> float:
    """Print each contender and the first one's speed-up over the second (the baseline); returns it."""
    for key, seconds in medians.items():
        print(f"  {key:18s} {seconds:8.3f} s/step  {samples / seconds:9.1f} samples/s  (median of {steps})")
    contender, baseline = medians
    ratio = medians[baseline] / medians[contender]
    print(f"  {what}: {contender} / {baseline} = {ratio:.2f}x")
    return ratio


PARTS = ("open_clip", "patch_dropout", "siglip")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="which comparisons to run")
    parser.add_argument("--models", nargs="+", default=["ViT-B/32", "RN50"], choices=sorted(OPEN_CLIP_NAMES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender (after one warm-up)")
    parser.add_argument("--batch", type=int, default=None, help="default: 16 for ViT-B/32, 8 for the others")
    parser.add_argument("--patch-dropout", type=float, default=0.5)
    parser.add_argument("--loss-batch", type=int, default=4096, help="local batch of the loss comparison")
    parser.add_argument("--loss-dim", type=int, default=512)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 on CPU")
    if "open_clip" in args.parts:
        for name in args.models:
            print(f"(1) {name}, rayclip vs open_clip:")
            compare(name, args.batch or DEFAULT_BATCH[name], args.steps)
    if "patch_dropout" in args.parts:
        print(f"(2) patch dropout {args.patch_dropout} vs 0:")
        patch_dropout(args.batch or DEFAULT_BATCH["ViT-B/16"], args.patch_dropout, args.steps)
    if "siglip" in args.parts:
        print("(3) SigLIP vs CLIP loss:")
        siglip_loss(args.loss_batch, args.loss_dim, args.steps + 2)


if __name__ == "__main__":
    main()
