"""The typed sections of a run config besides ``data``: model, optim, schedule, loss, deepspeed, scaling,
checkpoint, tracking, eval. Every section forbids unknown keys, and every field has a docstring."""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models import SIGLIP_INIT_LOGIT_SCALE, get_model_spec, list_models


SIGLIP_INIT_TEMPERATURE = round(math.exp(-SIGLIP_INIT_LOGIT_SCALE), 12)  # 0.1


class ConfigSection(BaseModel):
    """Base of every section: unknown keys are errors, field docstrings are the documentation."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(ConfigSection):
    name: str = "ViT-tiny"
    """Architecture from ``models.registry.list_models()`` ("RN50".."RN50x64", "ViT-B/32".."ViT-L/14@336px",
    debug sizes "RN-tiny", "ViT-tiny")."""
    image_size: int | None = Field(default=None, gt=0)
    """Override of the architecture's input resolution (pixels); null keeps the paper's."""
    context_length: int | None = Field(default=None, ge=8, le=77)
    """Override of the text context (tokens incl. [SOS]/[EOS]); null keeps 77."""
    quick_gelu: bool | None = None
    """Override of the activation; null keeps the spec's QuickGELU (needed for OpenAI weight parity)."""
    grad_checkpointing: bool = False
    """Recompute residual blocks in backward: less activation memory for ~30% more compute (paper: on)."""
    compile: bool = False
    """``torch.compile`` the model inside the DeepSpeed engine. The first steps pay the compilation (text
    lengths vary per batch, so one dynamic-shape recompile follows); compiled steps need less memory, so a
    larger micro-batch may fit. Measured speed: docs/benchmarks.md."""
    init_from: str | None = None
    """Start from these weights instead of a random initialisation: an OpenAI-layout ``.pt`` (OpenAI's released
    TorchScript file or state dict, or a rayclip export ``openai_model.pt``), or a rayclip run name, run folder
    or checkpoint folder, local or ``s3://`` (resolved as ``jobs/evaluate.py --model``); its architecture must
    be ``name``'s. Unlike ``--resume``, the step, the optimizer state and the data position start fresh."""
    init_towers: list[Literal["image", "text"]] = Field(default_factory=lambda: ["image", "text"], min_length=1)
    """Which towers ``init_from`` loads; the others keep their random initialisation (LiT: ``[image]``, a
    pretrained image tower with a text tower trained from scratch). The temperature is loaded with both."""
    lock_image: bool = False
    """Freeze the image tower (LiT): no gradient, no optimizer state, bit-identical after training."""
    lock_image_unlocked_layers: int = Field(default=0, ge=0)
    """With ``lock_image``: the last N blocks of the image tower (ViT: Transformer blocks; ResNet: stages,
    counting the attention pool as the last) stay trainable, with the tower's final norm and projection."""
    lock_text: bool = False
    """Freeze the text tower: no gradient, no optimizer state, bit-identical after training."""
    lock_text_unlocked_layers: int = Field(default=0, ge=0)
    """With ``lock_text``: the last N Transformer blocks of the text tower stay trainable, with ``ln_final``
    and the text projection."""
    lock_norm_stats: bool = True
    """Locked BatchNorm layers (ResNet image towers) keep their running statistics: they normalise as in
    evaluation. False lets them follow the training batches."""
    lock_norm_params: bool = False
    """Also freeze the normalisation layers' own weights inside the unlocked blocks (only the linear and conv
    weights of those blocks train)."""
    patch_dropout: float = Field(default=0.0, ge=0, lt=1)
    """FLIP's patch dropout (ViT image towers): each training image keeps a random (1 - this) share of its
    patch tokens, the class token always; evaluation and exports see every patch. 0.5 roughly halves the image
    tower's step cost."""
    patch_dropout_off_last_steps: int = Field(default=0, ge=0)
    """Train the last N steps without patch dropout (FLIP's unmasked tuning, which closes most of its gap)."""

    @field_validator("name")
    @classmethod
    def _known_architecture(cls, name: str) -> str:
        if name not in list_models():
            raise ValueError(f"unknown architecture; allowed: {', '.join(list_models())}")
        return name

    @model_validator(mode="after")
    def _recipe_fits_the_architecture(self) -> "ModelConfig":
        spec = self.spec()
        problems = []
        if self.patch_dropout > 0 and spec.vision.kind != "vit":
            problems.append(f"model.patch_dropout={self.patch_dropout} needs a ViT image tower ({self.name} is a ResNet); "
                            "allowed: 0")
        image_blocks = spec.vision.layers if spec.vision.kind == "vit" else len(spec.vision.layers) + 1
        for tower, locked, unlocked, blocks in (("image", self.lock_image, self.lock_image_unlocked_layers, image_blocks),
                                                ("text", self.lock_text, self.lock_text_unlocked_layers, spec.text.layers)):
            if unlocked and not locked:
                problems.append(f"model.lock_{tower}_unlocked_layers={unlocked} needs model.lock_{tower}: true; allowed: 0")
            elif unlocked > blocks:
                problems.append(f"model.lock_{tower}_unlocked_layers={unlocked}: {self.name}'s {tower} tower has {blocks} "
                                f"blocks; allowed: 0..{blocks}")
        if len(set(self.init_towers)) != len(self.init_towers):
            problems.append(f"model.init_towers={self.init_towers} repeats a tower; allowed: [image], [text] or [image, text]")
        if self.init_towers != ["image", "text"] and self.init_from is None:
            problems.append("model.init_towers is set but model.init_from is not; allowed: set model.init_from, or drop init_towers")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def tower_locks(self) -> list[tuple[Literal["image", "text"], int]]:
        """(tower, unlocked_layers) of each tower ``lock_image``/``lock_text`` lock, image first."""
        wanted = [("image", self.lock_image, self.lock_image_unlocked_layers),
                  ("text", self.lock_text, self.lock_text_unlocked_layers)]
        return [(tower, unlocked) for tower, locked, unlocked in wanted if locked]

    def spec(self):
        """The ``ModelSpec`` this section describes (registry entry plus overrides)."""
        return get_model_spec(
            self.name, image_size=self.image_size, context_length=self.context_length, quick_gelu=self.quick_gelu
        )


class OptimConfig(ConfigSection):
    lr: float = Field(default=5e-4, gt=0)
    """Peak learning rate, reached at the end of warmup."""
    weight_decay: float = Field(default=0.2, ge=0)
    """Decoupled (AdamW) decay on weight matrices only; gains, biases, embeddings and logit scale get none."""
    beta1: float = Field(default=0.9, ge=0, lt=1)
    """Adam first-moment decay."""
    beta2: float | None = Field(default=None, ge=0, lt=1)
    """Adam second-moment decay; null takes the paper's value for the tower kind (ViT 0.98, ResNet 0.999)."""
    eps: float | None = Field(default=None, gt=0)
    """Adam epsilon; null takes the paper's value for the tower kind (ViT 1e-6, ResNet 1e-8)."""
    grad_clip_norm: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value (DeepSpeed ``gradient_clipping``); null disables."""


class ScheduleConfig(ConfigSection):
    kind: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    """Shape after linear warmup: cosine decay (paper), linear decay, or constant."""
    warmup_steps: int = Field(default=2000, ge=0)
    """Optimizer steps of linear warmup from 0 to ``optim.lr`` (paper: 2,000)."""
    total_steps: int = Field(default=1000, gt=0)
    """Optimizer steps of the whole run; the decay reaches ``min_lr_ratio * lr`` here."""
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    """Floor of the decay as a fraction of the peak learning rate."""
    stop_after_steps: int | None = Field(default=None, gt=0)
    """End this job after this many global steps (with a checkpoint) while keeping the schedule of
    ``total_steps``: for time-boxed jobs that a later ``--resume`` continues. Null runs to the end."""


class LossConfig(ConfigSection):
    kind: Literal["clip", "siglip"] = "clip"
    """clip: the paper's softmax contrastive loss over the global batch. siglip: the sigmoid loss of Zhai et al.
    2023 (every pair a binary problem, a learnable bias; ranks exchange text features around a ring, so no
    N_global x N_global matrix exists); its model carries ``logit_bias``, exported with the weights."""
    init_temperature: float = Field(default=0.07, gt=0, lt=1)
    """Initial temperature; the learnable logit scale starts at log(1/this) (paper: 0.07; with ``kind: siglip``
    the SigLIP paper's 0.1, a scale of 10, unless set)."""
    init_bias: float = -10.0
    """``kind: siglip``: the logit bias's initial value (SigLIP paper: -10, the loss's prior of one positive
    among many negatives)."""
    learn_temperature: bool = True
    """Train the temperature (paper) or keep it fixed at ``init_temperature``."""
    max_logit_scale: float = Field(default=100.0, gt=1)
    """exp(logit scale) is clamped here, preventing training instability (paper: 100)."""
    max_nonfinite_in_row: int = Field(default=5, ge=1)
    """Steps with a NaN/inf loss are skipped and counted; this many in a row aborts the run."""

    @model_validator(mode="before")
    @classmethod
    def _siglip_starts_at_its_papers_temperature(cls, data):
        if isinstance(data, dict) and data.get("kind") == "siglip" and "init_temperature" not in data:
            return {**data, "init_temperature": SIGLIP_INIT_TEMPERATURE}
        return data


class DeepSpeedConfig(ConfigSection):
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 data-parallel only, 1 shards optimizer states, 2 also gradients, 3 also parameters."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Training precision; auto is bf16 on GPU and fp32 on CPU (bf16 on CPU is many times slower). bf16 means
    bf16 autocast over fp32 weights (DeepSpeed's torch_autocast), never bf16 weights."""
    micro_batch_size: int = Field(default=64, gt=0)
    """Samples per worker per forward/backward chunk (what must fit in one device's memory)."""
    grad_accum_steps: int = Field(default=1, ge=1)
    """Chunks per optimizer step. Every chunk's loss still sees all negatives of the whole global batch."""
    global_batch_size: int | None = Field(default=None, gt=0)
    """Samples per optimizer step over all workers; null: micro_batch_size x grad_accum_steps x the (largest)
    worker count. When set, it is kept at every worker count: each worker's share (ranks differ by at most one
    sample) in as many chunks of at most micro_batch_size as the largest share needs, so an elastic run that
    shrinks or grows keeps the same optimisation."""
    offload_optimizer: bool = False
    """ZeRO 1-3: keep optimizer states in CPU memory (slower steps, less device memory)."""


class ScalingSection(ConfigSection):
    num_workers: int | tuple[int, int] = 2
    """Ray Train workers (one per GPU on a GPU cluster); ``[min, max]`` trains elastically: the run starts once
    ``min`` can be placed, shrinks when a node is lost and grows back to ``max`` when capacity returns (each
    resize restarts the workers from the latest checkpoint with the same global batch)."""
    resize_check_s: float = Field(default=60.0, gt=0)
    """Elastic runs: how often Ray Train checks whether more workers could be placed (a grow is a restart)."""
    use_gpu: bool = False
    """One GPU per worker; false trains on CPU with the gloo backend."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """CPUs reserved per training worker (data loading runs in separate Ray Data tasks)."""
    accelerator_type: str | None = None
    """Pin workers to a GPU type known to Ray (e.g. "H100"); null takes any."""
    gpu_type: Literal["a100-40gb", "a100-80gb", "h100", "h200"] | None = None
    """The GPU the workers will have, for the memory check before launch (``jobs/plan.py``'s arithmetic: a batch
    plan that cannot fit is refused naming the term, before any cluster time); places nothing. Null: checked
    only when ``accelerator_type`` names a GPU the planner knows."""
    extra_resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each worker also needs, to place workers on labelled nodes (e.g. {"spot": 1})."""

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError(f"must be a positive count or [min, max] with 1 <= min <= max; got {value!r}")
        return value

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def worker_counts(self) -> range:
        """Every worker count the run may train on."""
        return range(self.min_workers, self.max_workers + 1)


class CheckpointConfig(ConfigSection):
    storage_path: str = "outputs/ray"
    """Where Ray Train keeps run directories and checkpoints: a local path or ``s3://bucket/prefix``."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, moto) for an ``s3://`` storage path; null uses AWS. Credentials
    come from the standard AWS chain, never from this file."""
    every_steps: int = Field(default=100, gt=0)
    """Checkpoint every N optimizer steps (and at the end)."""
    background: bool = True
    """Upload checkpoints on a background thread: training stops only while each rank writes its files to local
    scratch disk, and a checkpoint counts (manifest, Ray Train) once every rank's upload succeeded. False uploads
    before training goes on. The final checkpoint is always complete before the run ends."""
    num_to_keep: int | None = Field(default=2, gt=0)
    """Most recent checkpoints kept in storage; null keeps all."""
    max_failures: int = Field(default=3, ge=-1)
    """Worker or node failures survived by restarting from the latest intact checkpoint (-1: unlimited). Errors a
    restart cannot heal (bad data over the error budget, a full disk, a damaged checkpoint with nothing intact
    before it, a diverging loss) stop the run at once instead."""
    stop_timeout_s: float = Field(default=300.0, gt=0)
    """On Ctrl-C (or SIGTERM) the job saves a checkpoint at the next step and stops; past this many seconds it
    stops without one (the run resumes from its last checkpoint)."""
    audit_sample_ids: bool = False
    """Keep every consumed sample id in the checkpoints, to prove a resumed run repeats and skips no
    data. Grows with the run: for tests and small runs."""


class TrackingConfig(ConfigSection):
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI: an http(s) server on a cluster, or a local store (relative sqlite paths
    resolve against the directory the job is started from)."""
    experiment: str = "rayclip"
    """MLflow experiment name (created if missing)."""
    run_name: str | None = None
    """MLflow run name; null uses the top-level ``name``."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Extra MLflow run tags (a Tune search sets ``mlflow.parentRunId`` to nest its trials under its run)."""
    register_model_name: str | None = None
    """Register the exported model under this name in the MLflow model registry; null skips."""
    artifact_location: str | None = None
    """Where a new MLflow experiment keeps its artifacts (config, plots, exported model): an ``s3://`` URL
    or a folder; null puts them beside a local sqlite store (``<store folder>/mlartifacts``) or lets a
    tracking server use its own artifact store."""
    log_every_steps: int = Field(default=10, gt=0)
    """Log training metrics every N optimizer steps."""
    system_metrics: bool = False
    """Let MLflow sample CPU/GPU/memory utilisation on rank 0's node."""
    required: bool = True
    """Check before Ray starts that the tracking store answers, and refuse to start when it does not (exit 2);
    false trains even so, and everything logged waits for the store until the run ends."""
    flush_timeout_s: float = Field(default=300.0, ge=0)
    """At the end of a run, how long to wait for a store that does not answer before the run ends with what
    could not be sent kept in ``<run folder>/mlflow_unsent.jsonl``. While the run trains, nothing waits: writes
    are kept and retried in the background."""
    run_id: str | None = None
    """The MLflow run this run logs to; ``jobs/pretrain.py`` creates it before Ray starts (null: rank 0 creates
    one)."""


EVAL_TASKS = ("zeroshot", "retrieval", "linear-probe", "contrastive-loss")
EVAL_LAYOUTS = ("auto", "clip_benchmark", "image_folder", "rayclip")
_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _check_templates(templates: list[str] | None) -> list[str] | None:
    if templates is None:
        return None
    if not templates:
        raise ValueError("at least one template is needed")
    bad = [t for t in templates if "{}" not in t and "{c}" not in t]
    if bad:
        raise ValueError(f"templates need a '{{}}' (or CLIP_benchmark's '{{c}}') slot for the class name: {bad}")
    return [t.replace("{c}", "{}") for t in templates]


class EvalSetConfig(ConfigSection):
    """One evaluation set: where it is, its layout, the task, and how often the training loop runs it."""

    name: str
    """Name in the log and in metric names (``eval/<name>/zeroshot_top1``): letters, digits, ``_ . -``."""
    data: str
    """The set's root or split folder, local or ``s3://``: CLIP_benchmark's WebDataset layout, an image-folder
    tree (``val/<class>/*.JPEG``), or rayclip shards with class names (``prepare_data.py`` output)."""
    task: Literal["zeroshot", "retrieval", "linear-probe", "contrastive-loss"] = "zeroshot"
    """zeroshot: top-1/top-5/mean per-class recall with prompt ensembling; retrieval: image<->text recall@1/5/10
    with every caption; linear-probe: logistic regression on frozen image features (train split -> test split);
    contrastive-loss: the training loss on held-out image-caption pairs (batches of ``eval.batch_size``)."""
    layout: Literal["auto", "clip_benchmark", "image_folder", "rayclip"] = "auto"
    """How the set is stored; auto tells them apart by their files (nshards.txt, manifest.json, class folders)."""
    split: str = "test"
    """The split evaluated (CLIP_benchmark: a folder name; rayclip: test = heldout/)."""
    train_split: str = "train"
    """linear-probe only: the split the probe is fit on (its validation part is carved from it)."""
    classnames: str | None = None
    """A file of class names, one per line in class-index order, overriding the set's own."""
    templates: list[str] | None = None
    """Prompt templates overriding the set's own (else the paper's 80 ImageNet templates)."""
    every_steps: int | None = Field(default=None, gt=0)
    """Evaluate every N optimizer steps during pretraining; it always runs at the end. Null: at the end only."""
    max_images: int | None = Field(default=None, gt=0)
    """Evaluate on the first N images of the split only (quick checks); null uses all."""
    max_train_images: int | None = Field(default=None, gt=0)
    """linear-probe only: fit on the first N images of the training split; null uses all."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint for an ``s3://`` set; null uses ``data.s3_endpoint_url``."""

    @field_validator("name")
    @classmethod
    def _metric_safe_name(cls, name: str) -> str:
        if not _SET_NAME.fullmatch(name):
            raise ValueError("allowed: letters, digits and '_', '.', '-' (it becomes part of metric names)")
        return name

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str] | None) -> list[str] | None:
        return _check_templates(templates)


class EvalConfig(ConfigSection):
    enabled: bool = True
    """Run evaluation during pretraining: the labelled held-out split (``heldout``) and every entry of ``sets``."""
    heldout: bool = True
    """Zero-shot on the training data's labelled held-out split ``data.heldout`` (default ``<data.shards>/heldout``,
    e.g. Fashion-MNIST's 10k test images), named ``heldout``; its manifest names the classes and the held-out
    template. Its top-1/top-5 are also logged as ``zero_shot_top1`` / ``zero_shot_top5``."""
    sets: list[EvalSetConfig] = Field(default_factory=list)
    """More evaluation sets (benchmark layouts, retrieval, linear probes), each with its own period."""
    every_steps: int | None = Field(default=None, gt=0)
    """Evaluate the held-out split every N optimizer steps; it always runs once at the end. Null: at the end only."""
    templates: list[str] | None = None
    """Prompt templates for the held-out split, each with a "{}" slot; null uses the split's own template
    (never one seen in training)."""
    max_images: int | None = Field(default=None, gt=0)
    """Evaluate the held-out split on its first N images only (quick checks); null uses all."""
    batch_size: int = Field(default=500, gt=0)
    """Images per forward pass and worker during evaluation."""
    keep_decoded_mb: int = Field(default=1024, ge=0)
    """In-loop evaluation: each worker keeps its share of every set decoded (uint8 pixels at the model's
    resolution) between evaluations, up to this many MB per worker over all sets, so that later evaluations
    skip reading and decoding. A share that does not fit is decoded every time. 0: never kept."""

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str] | None) -> list[str] | None:
        return _check_templates(templates)

    @field_validator("sets")
    @classmethod
    def _distinct_names(cls, sets: list[EvalSetConfig]) -> list[EvalSetConfig]:
        names = [s.name for s in sets]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"set names must be distinct; repeated: {', '.join(repeated)}")
        return sets
