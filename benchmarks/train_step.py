"""Samples/s of one CLIP training step, rayclip vs open_clip, same architecture, batch and threads.

A step is forward, contrastive loss, backward and an AdamW update. Baseline: open_clip's model of the same
architecture (QuickGELU variants, as OpenAI's), open_clip's ClipLoss and ``torch.optim.AdamW`` with its
defaults, as open_clip's training script builds it. Ours: ``models.create_model`` + ``models.ClipLoss`` +
AdamW with ``fused=True``. Both see the same images and the same token ids of real captions. Steps of the
two alternate so that load from other processes on this shared machine hits both alike; the ratio of
medians is printed.

    python benchmarks/train_step.py                 # ViT-B/32 batch 16 and RN50 batch 8, 3 timed steps each
    python benchmarks/train_step.py --steps 5 --models ViT-B/32
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from models import create_model
from models.loss import ClipLoss
from models.tokenizer import get_tokenizer

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


def ours(name: str):
    model = create_model(name).train()
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.2, fused=True)

    def step(images, tokens):
        loss = loss_fn(*model(images, tokens))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def open_clips(name: str):
    import open_clip
    from open_clip.loss import ClipLoss as OpenClipLoss

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


def compare(name: str, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    tokens = get_tokenizer()(real_captions(batch))
    images = torch.randn(batch, 3, 224, 224)
    longest = int((tokens != 0).sum(dim=1).max())
    contenders = {"open_clip": open_clips(name), "rayclip": ours(name)}
    times: dict[str, list[float]] = {key: [] for key in contenders}
    for key, step in contenders.items():
        step(images, tokens)  # warm-up (allocator, first-call overheads)
    for _ in range(steps):
        for key, step in contenders.items():
            start = time.perf_counter()
            step(images, tokens)
            times[key].append(time.perf_counter() - start)
    median = {key: statistics.median(values) for key, values in times.items()}
    for key in contenders:
        print(f"  {key:9s} {batch / median[key]:6.2f} samples/s  ({median[key]:.2f} s/step, median of {steps})")
    ratio = median["open_clip"] / median["rayclip"]
    print(f"  {name} batch {batch} (longest caption {longest} tokens of 77): rayclip / open_clip = {ratio:.2f}x")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-B/32", "RN50"], choices=sorted(OPEN_CLIP_NAMES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="default: 16 for ViT-B/32, 8 for the others")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 on CPU")
    for name in args.models:
        print(f"{name}:")
        compare(name, args.batch or DEFAULT_BATCH[name], args.steps)


if __name__ == "__main__":
    main()
