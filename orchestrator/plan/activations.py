"""Activation memory per training sample, derived layer by layer from the model spec.

What is counted is what autograd keeps between a tower's forward and its backward, tensor by tensor, for
rayclip's own modules (``models/transformer.py``, ``models/vit.py``, ``models/resnet.py``):

- a pre-LN Transformer block keeps both LayerNorm inputs (the residual stream), the inputs of its
  matmuls, the fused QKV output, the attention output and log-sum-exp (flash / memory-efficient attention
  keep no L x L matrix), the MLP's hidden output and, with QuickGELU, the sigmoid beside it;
- a ModifiedResNet bottleneck keeps every convolution's and batch norm's output (the in-place ReLUs reuse
  them), the anti-aliasing pools' outputs and the shortcut's pool and convolution;
- with gradient checkpointing a checkpointed block keeps only its input, and its full activations exist
  again, one block at a time, while backward recomputes it (the stem, ``ln_pre`` and the pools are not
  checkpointed in ``models``, so they stay).

Widths follow the precision: under autocast (fp32 weights) the residual stream and LayerNorm statistics
are float32 while matmul inputs/outputs are the bf16 copies autocast makes; with bf16 weights everything
is 2 bytes; fp32 everything 4. A unit test checks these counts against autograd's saved tensors, also with patch dropout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models import ModelSpec, kept_patch_count

Precision = Literal["autocast", "bf16", "fp32"]
PRECISIONS: tuple[Precision, ...] = ("autocast", "bf16", "fp32")


@dataclass(frozen=True)
class Widths:
    """Bytes per element of the two kinds of activation: the residual stream, and matmul operands."""

    residual: int
    matmul: int

    @classmethod
    def of(cls, precision: Precision) -> "Widths":
        return {"autocast": cls(4, 2), "bf16": cls(2, 2), "fp32": cls(4, 4)}[precision]


@dataclass(frozen=True)
class TowerActivations:
    """Bytes per sample one tower keeps for backward: always, and the recomputed block's extra in backward."""

    kept: int
    """Held from the forward until backward reaches it."""
    recompute_peak: int
    """With checkpointing: the largest block's full activations, alive while backward recomputes it (0 without)."""

    @property
    def peak(self) -> int:
        return self.kept + self.recompute_peak


def transformer_block(tokens: int, width: int, heads: int, quick_gelu: bool, widths: Widths) -> int:
    """Bytes one pre-LN residual attention block keeps for backward, for one sample of ``tokens`` tokens."""
    residual = 2 * width * widths.residual  # ln_1 and ln_2 inputs
    # in_proj input, qkv (3), attention output (out_proj reads a view of it: flash attention's output is laid
    # out (B, L, H, hd), so the transpose-reshape copies nothing), c_fc input, c_fc output (4), c_proj input (4)
    matmul = (1 + 3 + 1 + 1 + 4 + 4) * width
    if quick_gelu:
        matmul += 4 * width  # x * sigmoid(1.702 x) keeps the sigmoid beside its input
    statistics = 2 * 2 * 4 + heads * 4  # mean and rstd of both LayerNorms, attention log-sum-exp (float32)
    return tokens * (residual + matmul * widths.matmul + statistics)


def transformer_stack(tokens: int, width: int, heads: int, layers: int, *, quick_gelu: bool,
                      checkpointing: bool, widths: Widths) -> TowerActivations:
    """A stack of ``layers`` blocks: all blocks' activations, or with checkpointing their inputs plus one block."""
    block = transformer_block(tokens, width, heads, quick_gelu, widths)
    if not checkpointing:
        return TowerActivations(layers * block, 0)
    return TowerActivations(layers * tokens * width * widths.residual, block)


def vit_tower(spec: ModelSpec, *, checkpointing: bool, widths: Widths, patch_dropout: float = 0.0) -> TowerActivations:
    """The ViT: patch convolution's input copy, ``ln_pre``'s input, then the Transformer over patches + class
    token; with FLIP's ``patch_dropout`` the kept tokens from ``ln_pre`` on, and what the token gather keeps."""
    vision = spec.vision
    patches = (vision.image_size // vision.patch_size) ** 2
    tokens = 1 + kept_patch_count(patches, patch_dropout)  # the class token and the patches the Transformer runs
    pixels = 3 * vision.image_size**2
    cast_images = pixels * widths.matmul if widths.matmul != 4 else 0  # autocast's bf16 copy of the images
    stem = cast_images + tokens * vision.width * widths.matmul + tokens * 8  # ln_pre input and statistics
    if patch_dropout > 0:  # the gather keeps its whole input (every token) and the argsort its int64 indices
        stem += (patches + 1) * vision.width * widths.matmul + patches * 8
    stack = transformer_stack(tokens, vision.width, vision.heads, vision.layers, quick_gelu=spec.quick_gelu,
                              checkpointing=checkpointing, widths=widths)
    last = tokens * vision.width * widths.residual  # ln_post reads the class token, a view that keeps all tokens
    return TowerActivations(stem + stack.kept + last, stack.recompute_peak)


def text_tower(spec: ModelSpec, tokens: int, *, checkpointing: bool, widths: Widths) -> TowerActivations:
    """The text Transformer over ``tokens`` positions (the batch's longest caption) and ``ln_final``'s input."""
    text = spec.text
    stack = transformer_stack(tokens, text.width, text.heads, text.layers, quick_gelu=spec.quick_gelu,
                              checkpointing=checkpointing, widths=widths)
    ln_final = tokens * (text.width * widths.residual + 8)
    return TowerActivations(ln_final + stack.kept, stack.recompute_peak)


def _bottleneck(inplanes: int, planes: int, side: int, stride: int, low: int) -> tuple[int, int]:
    """(bytes a ModifiedResNet bottleneck keeps, bytes of its input) for one sample at input side ``side``."""
    out_side = side // stride
    inner = 4 * planes * side**2  # conv1, bn1/relu1, conv2, bn2/relu2 outputs
    if stride > 1:
        inner += planes * out_side**2  # the anti-aliasing pool before conv3
    inner += 2 * 4 * planes * out_side**2  # conv3 output, and the residual sum the in-place ReLU keeps
    if stride > 1 or inplanes != 4 * planes:
        inner += 4 * planes * out_side**2 + (inplanes * out_side**2 if stride > 1 else 0)  # shortcut conv (+ pool)
    return inner * low, inplanes * side**2 * low


def resnet_tower(spec: ModelSpec, *, checkpointing: bool, widths: Widths) -> TowerActivations:
    """The ModifiedResNet: 3-conv stem, four stages of bottlenecks, attention pool."""
    vision, low = spec.vision, widths.matmul
    width, side = vision.width, vision.image_size // 2
    pixels = 3 * vision.image_size**2
    stem = (pixels if low != 4 else 0) + 4 * width * side**2 + width * (side // 2) ** 2
    kept, largest = stem * low, 0
    inplanes, side = width, side // 2
    for stage, blocks in enumerate(vision.layers):
        planes = width * 2**stage
        for index in range(blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            block, block_input = _bottleneck(inplanes, planes, side, stride, low)
            first = stage == 0 and index == 0  # its input is the stem's output, counted with the stem
            kept += (0 if first else block_input) if checkpointing else block
            largest = max(largest, block)
            inplanes, side = 4 * planes, side // stride
    positions, channels = side**2 + 1, 32 * width
    kept += 3 * positions * channels * low + positions * vision.heads * 4  # x + pos, k, v; log-sum-exp
    return TowerActivations(kept, largest if checkpointing else 0)


def image_tower(spec: ModelSpec, *, checkpointing: bool, widths: Widths, patch_dropout: float = 0.0) -> TowerActivations:
    """The image tower the spec names (``vision.kind``); ``patch_dropout`` applies to a ViT only."""
    if spec.vision.kind == "vit":
        return vit_tower(spec, checkpointing=checkpointing, widths=widths, patch_dropout=patch_dropout)
    return resnet_tower(spec, checkpointing=checkpointing, widths=widths)
