"""Print the model zoo (parameters, resolution, forward GFLOPs) and tokenize a few captions.

    python jobs/model_zoo.py
"""

from __future__ import annotations

import torch

from jobs.cli import parse_no_args
from models import create_model, forward_flops, get_model_spec, get_tokenizer, list_models

SAMPLE_CAPTIONS = ["a diagram", "a dog", "A photo of a T-shirt/top.", "Café crème &amp; croissant 🥐 — “breakfast”"]


def main(argv: list[str] | None = None) -> None:
    parse_no_args(argv, __doc__)
    print(f"{'model':16s} {'tower':6s} {'params':>13s} {'res':>4s} {'GFLOPs/image':>13s} {'GFLOPs/text':>12s}")
    for name in list_models():
        spec = get_model_spec(name)
        with torch.device("meta"):
            params = sum(p.numel() for p in create_model(name).parameters())
        image_flops, text_flops = forward_flops(spec)
        print(
            f"{name:16s} {spec.vision.kind:6s} {params:13,d} {spec.vision.image_size:4d} "
            f"{image_flops / 1e9:13.2f} {text_flops / 1e9:12.2f}"
        )
    tokenizer = get_tokenizer()
    tokens = tokenizer(SAMPLE_CAPTIONS)
    print("\ntokenizer (OpenAI CLIP BPE, context 77):")
    for caption, row in zip(SAMPLE_CAPTIONS, tokens):
        print(f"  {caption!r:50s} -> {row[row != 0].tolist()}")


if __name__ == "__main__":
    main()
