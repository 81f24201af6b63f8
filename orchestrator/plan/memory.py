"""Per-GPU memory of one training step, term by term, and the micro-batch that fits a GPU.

The terms are those of rayclip's own step (``orchestrator/train``) under DeepSpeed, with W data-parallel
ranks and P parameters (counted from the model built on the meta device):

- parameters: P x weight bytes, divided by W under ZeRO-3;
- gradients: full P in the weight dtype for ZeRO 0/1 (ZeRO-1 adds its fp32 partition for the optimizer),
  the rank's fp32 partition P/W under ZeRO 2/3;
- optimizer state: fp32 master weights (DeepSpeed's ZeRO optimizers keep a clone even of fp32 weights;
  ZeRO-0 only with bf16 weights) and Adam's two fp32 moments, divided by W from ZeRO-1 on;
- autocast's bf16 copies of matmul/conv weights (rayclip's ``bf16`` is ``torch.autocast`` over fp32
  weights: ``orchestrator/train/engine.py``), kept for backward;
- ZeRO-3's gathered parameters: DeepSpeed releases a gathered parameter only if it is not reused within
  ``stage3_max_reuse_distance`` (default 1e9 elements) and keeps up to ``stage3_max_live_parameters``
  (1e9) gathered, so a model below 1e9 parameters stays whole from its forward through its backward
  (measured: one all-gather per step on CPU); larger ones hold the prefetch bucket and the persistent ones;
- activations per tower (``activations.py``) x micro-batch, and the step's input batch (every chunk);
- the sharded loss: N_local x N_global logits in both directions with their gradients, and the gathered
  image and text features with theirs. With several chunks the loss runs on cached features before the
  chunks' backward (``accumulated_step``), so it is not at the activation peak;
- DeepSpeed's gradient bucket: ``reduce_bucket_size`` elements (default 5e8: 2 GB in fp32) for ZeRO 1-3
  (twice with ``overlap_comm``; ZeRO-3 adds an fp32 buffer of its largest parameter), ZeRO-0's
  flattened all-reduce copy of the gradients;
- the allocator's headroom, what ``max_memory_allocated`` does not see: the CUDA context and NCCL's
  buffers (1 GiB) and the caching allocator's fragmentation (10% of the allocated peak).

Locked towers (``model.lock_image``/``lock_text``, :class:`TowerLock`) keep their parameters (ZeRO-3 still
partitions and gathers them) but no gradient, optimizer state or autocast copy (autocast caches its bf16
copy only of weights that require a gradient), and those terms count the trainable parameters alone. A
wholly locked tower keeps no activations: its forward saves nothing for a backward that never comes, and
only the block running at the time holds its activations (counted as the block's saved tensors, an upper
bound). The image tower runs first, so a locked one's block is alive before anything else is kept: a phase
of its own; a locked text tower's block adds to the image tower's kept activations. A tower with unlocked
blocks is counted as if it trained whole (an upper bound: its locked blocks keep nothing either).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from models import CLIP, ModelSpec, Tower, lock_tower
from orchestrator.batch_split import balanced_micro_batch
from orchestrator.plan.activations import Precision, TowerActivations, Widths, image_tower, text_tower

GIB = 2**30
DEFAULT_REDUCE_BUCKET = int(5e8)  # DeepSpeed's reduce_bucket_size default, elements
DEFAULT_PREFETCH_BUCKET = int(5e7)  # DeepSpeed's stage3_prefetch_bucket_size default, elements
MAX_LIVE_PARAMETERS = int(1e9)  # DeepSpeed's stage3_max_live_parameters and stage3_max_reuse_distance defaults
PERSISTENCE_THRESHOLD = int(1e5)  # DeepSpeed's stage3_param_persistence_threshold: smaller params stay gathered
RUNTIME_RESERVE = GIB  # CUDA context + NCCL communicator buffers, outside the caching allocator
FRAGMENTATION = 0.10  # reserved beyond allocated by PyTorch's caching allocator at a steady step
_MATMUL_MODULES = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class TowerLock:
    """A locked tower as ``models.lock_tower`` applies it (the run config's ``model.lock_image``/``lock_text``)."""

    tower: Tower
    unlocked_layers: int = 0
    norm_params: bool = False


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    matmul: int
    """In Linear/Conv2d/attention projections: what autocast copies to bf16 and DeepSpeed reduces in bf16."""
    persistent: int
    """In tensors below ZeRO-3's persistence threshold (kept gathered on every rank)."""
    largest: int
    trainable: int
    """Not locked: what has a gradient and optimizer state (all of ``total`` without locks)."""
    trainable_matmul: int
    trainable_largest: int


@functools.lru_cache(maxsize=64)
def parameter_counts(spec: ModelSpec, locks: tuple[TowerLock, ...] = ()) -> ParameterCounts:
    """Parameter counts of the CLIP the spec describes with ``locks`` applied, built on the meta device
    (no memory, instant)."""
    with torch.device("meta"):
        model = CLIP(spec)
    for lock in locks:
        lock_tower(model, lock.tower, lock.unlocked_layers, norm_stats=False, norm_params=lock.norm_params)
    total = matmul = persistent = largest = trainable = trainable_matmul = trainable_largest = 0
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        numels = [p.numel() for p in own]
        learnt = [p.numel() for p in own if p.requires_grad]
        total += sum(numels)
        trainable += sum(learnt)
        persistent += sum(n for n in numels if n < PERSISTENCE_THRESHOLD)
        largest = max([largest, *numels])
        trainable_largest = max([trainable_largest, *learnt])
        if isinstance(module, _MATMUL_MODULES) or type(module).__name__ == "SelfAttention":
            matmul += sum(numels)
            trainable_matmul += sum(learnt)
    return ParameterCounts(total, matmul, persistent, largest, trainable, trainable_matmul, trainable_largest)


@dataclass(frozen=True, kw_only=True)
class StepShape:
    """Everything the memory of a step depends on besides the GPU."""

    spec: ModelSpec
    world_size: int
    zero_stage: int
    precision: Precision
    micro_batch: int
    worker_batch: int
    """Rows of this worker's share of the global batch (all chunks)."""
    global_batch: int
    grad_checkpointing: bool
    text_tokens: int | None = None
    """Tokens the text tower runs (the batch's longest caption); None: the whole context (the safe bound)."""
    reduce_bucket_size: int = DEFAULT_REDUCE_BUCKET
    prefetch_bucket_size: int = DEFAULT_PREFETCH_BUCKET
    overlap_comm: bool | None = None
    """DeepSpeed's default (None) is on for ZeRO-3 only."""
    locks: tuple[TowerLock, ...] = ()
    patch_dropout: float = 0.0
    """FLIP's share of patch tokens a ViT drops in training (``model.patch_dropout``)."""

    @property
    def counts(self) -> ParameterCounts:
        return parameter_counts(self.spec, self.locks)

    def wholly_locked(self, tower: Tower) -> bool:
        return any(lock.tower == tower and lock.unlocked_layers == 0 for lock in self.locks)

    @property
    def chunks(self) -> int:
        return balanced_micro_batch(self.worker_batch, self.micro_batch)[1]

    @property
    def weight_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def tokens(self) -> int:
        return self.text_tokens or self.spec.text.context_length


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU by term, what is alive together at the peak, and the resulting total."""

    terms: dict[str, int]
    loss_at_activation_peak: bool
    labels: dict[str, str] = field(default_factory=dict)
    """A human description of each term (model, micro-batch, checkpointing)."""
    locked_image_forward: int = 0
    """A wholly locked image tower's running block, alive before any other activation (not in ``terms``)."""

    @property
    def allocated(self) -> int:
        """The allocator-level peak (what ``torch.cuda.max_memory_allocated`` reports)."""
        loss = self.terms["loss logits"] + self.terms["gathered features"]
        base = sum(v for k, v in self.terms.items() if k != "allocator headroom") - loss
        at_peak = loss if self.loss_at_activation_peak else 0
        activations = self.terms["activations: image tower"] + self.terms["activations: text tower"]
        loss_phase = base - activations + loss
        locked_phase = base - activations + self.locked_image_forward
        return max(base + at_peak, loss_phase, locked_phase)

    @property
    def total(self) -> int:
        return self.allocated + self.terms["allocator headroom"]


def _state_terms(shape: StepShape, counts: ParameterCounts) -> dict[str, int]:
    p, t, w, z, wb = counts.total, counts.trainable, shape.world_size, shape.zero_stage, shape.weight_bytes
    gradients = t * wb if z <= 1 else 4 * t // w
    if z == 1:
        gradients += 4 * t // w
    master = (4 * t if shape.precision == "bf16" else 0) if z == 0 else 4 * t // w
    moments = 8 * t if z == 0 else 8 * t // w
    overlap = shape.overlap_comm if shape.overlap_comm is not None else z == 3
    if z == 0:
        bucket = min(t, DEFAULT_REDUCE_BUCKET) * wb
    else:
        bucket = shape.reduce_bucket_size * wb * (2 if overlap and z < 3 else 1)
    if z == 3:
        bucket += counts.trainable_largest * 4  # ZeRO-3's step-time gradient buffer, sized for the largest parameter
    gathered = 0
    if z == 3 and p <= MAX_LIVE_PARAMETERS:
        gathered = p * wb
    elif z == 3:
        gathered = (shape.prefetch_bucket_size + counts.largest + counts.persistent) * wb
    return {
        "parameters": p * wb // (w if z == 3 else 1),
        "gradients": gradients,
        "optimizer state": master + moments,
        "autocast weight copies": 2 * counts.trainable_matmul if shape.precision == "autocast" else 0,
        "zero-3 gathered parameters": gathered,
        "deepspeed buckets": bucket,
    }


def estimate_memory(shape: StepShape) -> MemoryEstimate:
    """The per-GPU memory of one step of ``shape``, by term (see the module docstring)."""
    spec, widths = shape.spec, Widths.of(shape.precision)
    counts = shape.counts
    image = image_tower(spec, checkpointing=shape.grad_checkpointing, widths=widths, patch_dropout=shape.patch_dropout)
    text = text_tower(spec, shape.tokens, checkpointing=shape.grad_checkpointing, widths=widths)
    locked_image_forward = 0
    if shape.wholly_locked("image"):
        locked_image_forward = image_tower(spec, checkpointing=True, widths=widths,
                                           patch_dropout=shape.patch_dropout).recompute_peak
        image = TowerActivations(0, 0)
    if shape.wholly_locked("text"):  # runs after the image tower: its running block adds to what that keeps
        text = TowerActivations(0, text_tower(spec, shape.tokens, checkpointing=True, widths=widths).recompute_peak)
    recompute = max(image.recompute_peak, text.recompute_peak)  # the towers' backward passes run one after the other
    rows = min(shape.micro_batch, shape.worker_batch)
    image_bytes = rows * (image.kept + (recompute if image.recompute_peak >= text.recompute_peak else 0))
    text_bytes = rows * (text.kept + (recompute if image.recompute_peak < text.recompute_peak else 0))
    sample_input = 3 * spec.vision.image_size**2 * 4 + spec.text.context_length * 8  # float32 pixels, int64 ids
    terms = _state_terms(shape, counts)
    terms |= {
        "activations: image tower": image_bytes,
        "activations: text tower": text_bytes,
        "input batch": shape.worker_batch * sample_input,
        "loss logits": 2 * shape.worker_batch * shape.global_batch * 4 * 2,
        "gathered features": 2 * shape.global_batch * spec.embed_dim * 4 * 2,
    }
    estimate = MemoryEstimate(terms, shape.chunks == 1, _labels(shape), rows * locked_image_forward)
    terms["allocator headroom"] = RUNTIME_RESERVE + int(FRAGMENTATION * estimate.allocated)
    return estimate


def _labels(shape: StepShape) -> dict[str, str]:
    spec, ckpt = shape.spec, "checkpointing" if shape.grad_checkpointing else "no checkpointing"
    tower = "ViT" if spec.vision.kind == "vit" else "ResNet"
    rows = min(shape.micro_batch, shape.worker_batch)
    image_ckpt = "locked" if shape.wholly_locked("image") else ckpt
    if shape.patch_dropout:
        image_ckpt += f", patch dropout {shape.patch_dropout:g}"
    text_ckpt = "locked" if shape.wholly_locked("text") else ckpt
    trainable = f" of {shape.counts.trainable / 1e6:.1f}M trainable parameters" if shape.locks else ""
    return {
        "activations: image tower": f"activations ({spec.name} {tower} image tower, micro_batch {rows}, {image_ckpt})",
        "activations: text tower": f"activations ({spec.name} text tower, {shape.tokens} tokens, micro_batch {rows}, {text_ckpt})",
        "loss logits": f"loss logits ({shape.worker_batch} x {shape.global_batch}, both directions, with gradients)",
        "optimizer state": f"optimizer state (fp32 master + Adam moments{trainable}, ZeRO-{shape.zero_stage})",
        "deepspeed buckets": f"DeepSpeed gradient bucket ({shape.reduce_bucket_size:.0e} elements)",
    }
