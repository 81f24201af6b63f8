"""Forward-pass FLOP counts per image and per caption, for the model-zoo table and MFU.

Counted by ``torch.utils.flop_counter`` on the meta device (no memory, no compute), so even RN50x64
is instant. One multiply-add is two FLOPs. The text count is for a caption filling the whole context;
real captions cost less because ``encode_text`` stops at the batch's longest caption.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.clip import CLIP
from models.spec import ModelSpec


def forward_flops(spec: ModelSpec, patch_dropout: float = 0.0) -> tuple[int, int]:
    """(FLOPs of ``encode_image`` for one image, FLOPs of ``encode_text`` for one full-context caption).

    ``patch_dropout`` (ViT only): the image count of a training forward with FLIP's patch dropout, on the
    tokens it keeps (what MFU counts as work done)."""
    with torch.device("meta"):
        model = CLIP(spec).eval()
        if patch_dropout > 0:
            model.set_patch_dropout(patch_dropout)
            model.visual.train()  # patch dropout acts in training mode only
        images = torch.empty(1, 3, spec.vision.image_size, spec.vision.image_size)
        tokens = torch.zeros(1, spec.text.context_length, dtype=torch.long)
    tokens[:, -1] = spec.text.vocab_size - 1  # [EOS] in the last position: the full context runs
    counts = []
    for encode, inputs in ((model.encode_image, images), (model.encode_text, tokens)):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            encode(inputs)
        counts.append(counter.get_total_flops())
    return counts[0], counts[1]
