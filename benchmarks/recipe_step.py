"""What the pretraining recipes cost, side by side in one run: FLIP's patch dropout and SigLIP's loss.

(a) ViT-B/16 forward + contrastive loss + backward (no optimizer update, which patch dropout does not
    change) with ``patch_dropout`` 0.5 against 0, same images and real captions; the image tower runs on
    1 + 98 tokens instead of 1 + 196.
(b) The loss alone, forward + backward on random L2-normalised features (what the loss adds to a step at a
    large local batch): :class:`models.SigLipLoss` against :class:`models.ClipLoss`, single process.

Steps of the two contenders alternate, so load from other processes on a shared machine hits both alike;
the ratio of medians is printed.

    python benchmarks/recipe_step.py                              # ViT-B/16 batch 8; loss at 4096 x 512
    python benchmarks/recipe_step.py --steps 5 --loss-batch 8192
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from models import ClipLoss, SigLipLoss, create_model, get_tokenizer

Step = Callable[[], None]


def alternate(contenders: dict[str, Step], steps: int) -> dict[str, float]:
    """Median seconds per call of each contender, one warm-up call each, timed calls interleaved."""
    for step in contenders.values():
        step()
    times: dict[str, list[float]] = {key: [] for key in contenders}
    for _ in range(steps):
        for key, step in contenders.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def patch_dropout_steps(batch: int, fraction: float) -> dict[str, Step]:
    """One ViT-B/16 model, its forward/backward with and without patch dropout (switched per call)."""
    from train_step import real_captions  # the script's folder is on sys.path; the same captions as there

    torch.manual_seed(0)
    model = create_model("ViT-B/16").train()
    images = torch.randn(batch, 3, 224, 224)
    tokens = get_tokenizer()(real_captions(batch))
    loss_fn = ClipLoss()

    def step_with(share: float) -> Step:
        def step() -> None:
            model.set_patch_dropout(share)
            model.zero_grad(set_to_none=True)
            loss_fn(*model(images, tokens)).backward()

        return step

    return {f"patch_dropout {fraction}": step_with(fraction), "patch_dropout 0": step_with(0.0)}


def loss_steps(batch: int, dim: int) -> dict[str, Step]:
    """Forward + backward of each loss on the same (batch, dim) features, at each paper's initial scale."""
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).requires_grad_()
    clip_scale = torch.tensor(1 / 0.07, requires_grad=True)
    siglip_scale, siglip_bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    clip_loss, siglip_loss = ClipLoss(), SigLipLoss()

    def clip_step() -> None:
        clip_loss(images, texts, clip_scale).backward()

    def siglip_step() -> None:
        siglip_loss(images, texts, siglip_scale, siglip_bias).backward()

    return {"SigLipLoss": siglip_step, "ClipLoss": clip_step}


def report(title: str, medians: dict[str, float], samples: int, steps: int) -> None:
    print(title)
    for key, seconds in medians.items():
        print(f"  {key:18s} {seconds:8.3f} s/step  {samples / seconds:9.1f} samples/s  (median of {steps})")
    first, second = medians
    print(f"  speed-up of {first} over {second}: {medians[second] / medians[first]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender (after one warm-up)")
    parser.add_argument("--batch", type=int, default=8, help="ViT-B/16 images per step")
    parser.add_argument("--patch-dropout", type=float, default=0.5)
    parser.add_argument("--loss-batch", type=int, default=4096, help="local batch of the loss-only comparison")
    parser.add_argument("--loss-dim", type=int, default=512)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 on CPU")
    medians = alternate(patch_dropout_steps(args.batch, args.patch_dropout), args.steps)
    report(f"(a) ViT-B/16 forward+loss+backward, batch {args.batch}:", medians, args.batch, args.steps)
    medians = alternate(loss_steps(args.loss_batch, args.loss_dim), args.steps + 2)
    report(f"(b) loss forward+backward on {args.loss_batch} x {args.loss_dim} features:", medians,
           args.loss_batch, args.steps + 2)


if __name__ == "__main__":
    main()
