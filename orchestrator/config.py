"""The run configuration: one YAML per run, validated by typed pydantic sections before Ray starts.

Every section forbids unknown keys, so a typo is an error, never a silently ignored setting. Errors are
re-raised as :class:`ConfigError`, one line per problem naming the dotted field, the value given and
what is allowed. The validated config crosses into Ray workers as a plain dict (``model_dump()``) and is
rebuilt there with :meth:`RunConfig.from_dict`, so nothing a worker needs depends on driver globals.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.registry import get_model_spec, list_models
from orchestrator.data import DataConfig

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "local.yaml"

# The paper's AdamW betas/eps differ by image tower: the ViTs trained with a lower beta2 for stability.
PAPER_ADAM_BY_TOWER = {"vit": {"beta2": 0.98, "eps": 1e-6}, "resnet": {"beta2": 0.999, "eps": 1e-8}}


class ConfigError(ValueError):
    """A run config that cannot run; the message names each bad field, its value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(_Section):
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
    """``torch.compile`` the model inside the DeepSpeed engine. The first steps pay the compilation
    (about a minute for ViT-L/14 on an H100; text lengths vary per batch, so one dynamic-shape recompile
    follows). ViT-L/14, bf16 autocast, one H100: 377 samples/s eager at micro-batch 128, 716 compiled at
    micro-batch 256 (``benchmarks/results/gpu_step_h100.jsonl``)."""

    @field_validator("name")
    @classmethod
    def _known_architecture(cls, name: str) -> str:
        if name not in list_models():
            raise ValueError(f"unknown architecture; allowed: {', '.join(list_models())}")
        return name

    def spec(self):
        """The ``ModelSpec`` this section describes (registry entry plus overrides)."""
        return get_model_spec(
            self.name, image_size=self.image_size, context_length=self.context_length, quick_gelu=self.quick_gelu
        )


class OptimConfig(_Section):
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


class ScheduleConfig(_Section):
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


class LossConfig(_Section):
    init_temperature: float = Field(default=0.07, gt=0, lt=1)
    """Initial softmax temperature; the learnable logit scale starts at log(1/this) (paper: 0.07)."""
    learn_temperature: bool = True
    """Train the temperature (paper) or keep it fixed at ``init_temperature``."""
    max_logit_scale: float = Field(default=100.0, gt=1)
    """exp(logit scale) is clamped here, preventing training instability (paper: 100)."""
    max_nonfinite_in_row: int = Field(default=5, ge=1)
    """Steps with a NaN/inf loss are skipped and counted; this many in a row aborts the run."""


class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 data-parallel only, 1 shards optimizer states, 2 also gradients, 3 also parameters."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Training precision; auto is bf16 on GPU and fp32 on CPU (bf16 on CPU is many times slower). bf16 means
    bf16 autocast over fp32 weights (DeepSpeed's torch_autocast), never bf16 weights."""
    micro_batch_size: int = Field(default=64, gt=0)
    """Samples per worker per forward/backward chunk (what must fit in one device's memory)."""
    grad_accum_steps: int = Field(default=1, ge=1)
    """Chunks per optimizer step. Every chunk's loss still sees all negatives of the whole global batch."""
    offload_optimizer: bool = False
    """ZeRO 1-3: keep optimizer states in CPU memory (slower steps, less device memory)."""


class ScalingSection(_Section):
    num_workers: int = Field(default=2, gt=0)
    """Ray Train workers (one per GPU on a GPU cluster)."""
    use_gpu: bool = False
    """One GPU per worker; false trains on CPU with the gloo backend."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """CPUs reserved per training worker (data loading runs in separate Ray Data tasks)."""
    accelerator_type: str | None = None
    """Pin workers to a GPU type known to Ray (e.g. "H100"); null takes any."""
    extra_resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each worker also needs, to place workers on labelled nodes (e.g. {"spot": 1})."""


class CheckpointConfig(_Section):
    storage_path: str = "outputs/ray"
    """Where Ray Train keeps run directories and checkpoints: a local path or ``s3://bucket/prefix``."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, moto) for an ``s3://`` storage path; null uses AWS. Credentials
    come from the standard AWS chain, never from this file."""
    every_steps: int = Field(default=100, gt=0)
    """Checkpoint every N optimizer steps (and at the end)."""
    num_to_keep: int | None = Field(default=2, gt=0)
    """Most recent checkpoints kept in storage; null keeps all."""
    max_failures: int = Field(default=3, ge=-1)
    """Worker or node failures survived by restarting from the latest checkpoint (-1: unlimited)."""
    audit_sample_ids: bool = False
    """Keep every consumed sample id in the checkpoints, to prove a resumed run repeats and skips no
    data. Grows with the run: for tests and small runs."""


class TrackingConfig(_Section):
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI: an http(s) server on a cluster, or a local store (relative sqlite paths
    resolve against the directory the job is started from)."""
    experiment: str = "rayclip"
    """MLflow experiment name (created if missing)."""
    run_name: str | None = None
    """MLflow run name; null uses the top-level ``name``."""
    register_model_name: str | None = None
    """Register the exported model under this name in the MLflow model registry; null skips."""
    log_every_steps: int = Field(default=10, gt=0)
    """Log training metrics every N optimizer steps."""
    system_metrics: bool = False
    """Let MLflow sample CPU/GPU/memory utilisation on rank 0's node."""


class EvalConfig(_Section):
    enabled: bool = True
    """Zero-shot evaluation on the labelled held-out split ``data.heldout`` (default ``<data.shards>/heldout``,
    e.g. Fashion-MNIST's 10k test images), whose manifest names the classes and the held-out template."""
    every_steps: int | None = Field(default=None, gt=0)
    """Evaluate every N optimizer steps; it always runs once at the end. Null: at the end only."""
    templates: list[str] | None = None
    """Prompt templates ensembled per class, each with a "{}" slot; null uses the held-out split's own
    template (never one seen in training)."""
    max_images: int | None = Field(default=None, gt=0)
    """Evaluate on the first N images only (quick checks); null uses all."""
    batch_size: int = Field(default=500, gt=0)
    """Images per forward pass and worker during evaluation."""

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str] | None) -> list[str] | None:
        if templates is None:
            return None
        if not templates:
            raise ValueError("at least one template is needed")
        bad = [t for t in templates if "{}" not in t]
        if bad:
            raise ValueError(f"templates need a '{{}}' slot for the class name: {bad}")
        return templates


class RunConfig(_Section):
    name: str = "rayclip-local"
    """Run name: the Ray Train run directory under ``checkpoint.storage_path`` (``--resume`` takes it)."""
    seed: int = 0
    """Seed of model initialisation and per-rank RNGs."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        problems = _cross_field_problems(self)
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step across all workers: the paper's 32,768 for the big recipes."""
        return self.deepspeed.micro_batch_size * self.deepspeed.grad_accum_steps * self.scaling.num_workers

    @property
    def precision(self) -> Literal["bf16", "fp32"]:
        """The resolved precision: ``auto`` is bf16 on GPU, fp32 on CPU."""
        if self.deepspeed.precision == "auto":
            return "bf16" if self.scaling.use_gpu else "fp32"
        return self.deepspeed.precision

    def adam_betas_eps(self) -> tuple[tuple[float, float], float]:
        """AdamW (betas, eps): explicit values, else the paper's per image-tower kind."""
        paper = PAPER_ADAM_BY_TOWER[self.model.spec().vision.kind]
        beta2 = self.optim.beta2 if self.optim.beta2 is not None else paper["beta2"]
        eps = self.optim.eps if self.optim.eps is not None else paper["eps"]
        return (self.optim.beta1, beta2), eps

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """Validate a plain dict (YAML contents or a worker's copy); raises :class:`ConfigError`."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise ConfigError(format_validation_error(error, data)) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _data_shape_problems(cfg: RunConfig) -> list[str]:
    """The data stream must produce what the model and the batch plan need.

    ``data.image_size``, ``data.context_length`` and ``data.batch_size`` follow the model and the
    DeepSpeed batch plan unless set explicitly; an explicit value that disagrees is an error.
    """
    spec = cfg.model.spec()
    wanted = {
        "image_size": (spec.vision.image_size, "the model's input size (model.name / model.image_size)"),
        "context_length": (spec.text.context_length, "the model's text context (model.context_length)"),
        "batch_size": (
            cfg.deepspeed.micro_batch_size * cfg.deepspeed.grad_accum_steps,
            "deepspeed.micro_batch_size x deepspeed.grad_accum_steps (samples per worker per step)",
        ),
    }
    problems = []
    for name, (value, meaning) in wanted.items():
        if name not in cfg.data.model_fields_set:
            cfg.data.__dict__[name] = value  # derived, not user-set: keep it out of model_fields_set
        elif getattr(cfg.data, name) != value:
            problems.append(f"data.{name}={getattr(cfg.data, name)} must equal {meaning} = {value}; allowed: {value} or unset")
    return problems


def _cross_field_problems(cfg: RunConfig) -> list[str]:
    """Constraints between sections, each message naming the fields involved and what is allowed."""
    problems = _data_shape_problems(cfg)
    spec = cfg.model.spec()
    if spec.vision.kind == "vit" and spec.vision.image_size % spec.vision.patch_size:
        problems.append(
            f"model.image_size={spec.vision.image_size} must be a multiple of {cfg.model.name}'s patch size "
            f"{spec.vision.patch_size}"
        )
    if spec.vision.kind == "resnet" and spec.vision.image_size % 32:
        problems.append(f"model.image_size={spec.vision.image_size} must be a multiple of 32 for a ResNet tower")
    if cfg.deepspeed.precision == "bf16" and not cfg.scaling.use_gpu:
        problems.append("deepspeed.precision='bf16' needs scaling.use_gpu=true; allowed on CPU: 'fp32' or 'auto'")
    if cfg.schedule.warmup_steps > cfg.schedule.total_steps:
        problems.append(
            f"schedule.warmup_steps={cfg.schedule.warmup_steps} exceeds schedule.total_steps="
            f"{cfg.schedule.total_steps}; allowed: 0..total_steps"
        )
    stop = cfg.schedule.stop_after_steps
    if stop is not None and stop > cfg.schedule.total_steps:
        problems.append(f"schedule.stop_after_steps={stop} exceeds schedule.total_steps={cfg.schedule.total_steps}")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        problems.append("deepspeed.offload_optimizer=true needs deepspeed.zero_stage 1, 2 or 3 (got 0)")
    if cfg.checkpoint.s3_endpoint_url and not cfg.checkpoint.storage_path.startswith("s3://"):
        problems.append(
            f"checkpoint.s3_endpoint_url is set but checkpoint.storage_path={cfg.checkpoint.storage_path!r} "
            "is not an s3:// URL"
        )
    return problems


def format_validation_error(error: ValidationError, data: dict[str, Any]) -> str:
    """One line per problem: ``field = value: message``, with the allowed keys for unknown ones."""
    lines = []
    for problem in error.errors(include_url=False):
        location = ".".join(str(part) for part in problem["loc"]) or "<config>"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(problem["loc"][:-1]))
            message = f"unknown key; allowed here: {allowed}"
        value = "<missing>" if problem["type"] == "missing" else repr(problem.get("input"))
        if location == "<config>" or problem["type"] == "model_type":
            lines.append(f"{location}: {message}")
        else:
            lines.append(f"{location} = {value}: {message}")
    return "invalid run config:\n  " + "\n  ".join(lines)


def _allowed_keys(location: tuple) -> list[str]:
    section: type[BaseModel] = RunConfig
    for part in location:
        annotation = section.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        section = annotation
    return list(section.model_fields)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides (values parsed as YAML) to a copy of a config dict."""
    result = copy.deepcopy(data)
    for override in overrides:
        path, separator, raw = override.partition("=")
        if not separator or not path.strip():
            raise ConfigError(f"--set {override!r}: expected section.field=value (e.g. optim.lr=3e-4)")
        *parents, leaf = path.strip().split(".")
        node = result
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {override!r}: {part!r} is a value, not a section")
            node = child
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return result


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (default ``configs/local.yaml``), apply ``--set`` overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return RunConfig.from_dict(apply_overrides(data, overrides or []))


def output_base_dir(cwd: str | os.PathLike | None = None, environ: dict[str, str] | None = None) -> Path:
    """Where relative *output* paths (``checkpoint.storage_path``, a sqlite tracking store) resolve.

    The current directory, except in a ``ray job submit --working-dir`` job: its current directory is a
    copy that Ray deletes with the job's runtime resources, which would take checkpoints and the MLflow
    store along, so there ``~/rayclip`` is used. ``$RAYCLIP_HOME``, when set, always wins.
    """
    environ = os.environ if environ is None else environ
    if environ.get("RAYCLIP_HOME"):
        return Path(environ["RAYCLIP_HOME"]).expanduser().resolve()
    cwd = Path(cwd if cwd is not None else os.getcwd()).resolve()
    if "working_dir_files" in cwd.parts and "runtime_resources" in cwd.parts:
        return Path(environ.get("HOME", "~")).expanduser() / "rayclip"
    return cwd


def resolve_local_paths(cfg: RunConfig, base_dir: str | os.PathLike,
                        output_dir: str | os.PathLike | None = None) -> RunConfig:
    """Make relative local paths absolute: inputs against ``base_dir`` (the driver's cwd), outputs
    (checkpoints, a sqlite MLflow store) against ``output_dir`` (default: ``base_dir``).

    Ray workers run in other directories, so relative paths must be fixed on the driver before the
    config travels.
    """
    base = Path(base_dir).resolve()
    outputs = Path(output_dir).resolve() if output_dir is not None else base
    data = cfg.model_dump()
    storage = data["checkpoint"]["storage_path"]
    if "://" not in storage and not os.path.isabs(storage):
        data["checkpoint"]["storage_path"] = str(outputs / storage)
    uri = data["tracking"]["uri"]
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        data["tracking"]["uri"] = "sqlite:///" + str(outputs / uri.removeprefix("sqlite:///"))
    data["data"] = cfg.data.resolved(base).model_dump(exclude_unset=True)
    return RunConfig.from_dict(data)
