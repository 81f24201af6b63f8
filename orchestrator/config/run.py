"""The run configuration: one YAML per run, validated by typed pydantic sections before Ray starts.

Every section forbids unknown keys, so a typo is an error, never a silently ignored setting. Errors are
re-raised as :class:`ConfigError`, one line per problem naming the dotted field, the value given and
what is allowed. The validated config crosses into Ray workers as a plain dict (``model_dump()``) and is
rebuilt there with :meth:`RunConfig.from_dict`, so nothing a worker needs depends on driver globals.
"""

from __future__ import annotations

import copy
import math
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from orchestrator.batch_split import balanced_micro_batch, worker_shares
from orchestrator.config.data import DataConfig
from orchestrator.config.tune import TuneSection, metric_of_task, set_dotted
from orchestrator.config.sections import (
    CheckpointConfig,
    DeepSpeedConfig,
    EvalConfig,
    EvalSetConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ScalingSection,
    ScheduleConfig,
    TrackingConfig,
    ConfigSection,
)

HELDOUT_SET = "heldout"  # the name of the training data's labelled held-out split among the evaluation sets
# The paper's AdamW betas/eps differ by image tower: the ViTs trained with a lower beta2 for stability.
PAPER_ADAM_BY_TOWER = {"vit": {"beta2": 0.98, "eps": 1e-6}, "resnet": {"beta2": 0.999, "eps": 1e-8}}


class ConfigError(ValueError):
    """A run config that cannot run; the message names each bad field, its value and what is allowed."""


class RunConfig(ConfigSection):
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
    tune: TuneSection | None = None
    """A Ray Tune search over this config (``jobs/tune.py``); ``jobs/pretrain.py`` ignores it."""

    @model_validator(mode="before")
    @classmethod
    def _data_follows_the_model(cls, values: Any) -> Any:
        """Fill ``data.image_size``, ``data.context_length`` and ``data.batch_size`` from the model and
        the batch plan where the config leaves them out; an explicit value that disagrees is reported by
        the cross-field checks. Sections that do not validate are left to the normal errors."""
        if not isinstance(values, dict):
            return values
        data = values.get("data") or {}
        if isinstance(data, BaseModel):
            data = data.model_dump(exclude_unset=True)
        if not isinstance(data, dict):
            return values
        try:
            model = ModelConfig.model_validate(values.get("model") or {})
            deepspeed = DeepSpeedConfig.model_validate(values.get("deepspeed") or {})
            scaling = ScalingSection.model_validate(values.get("scaling") or {})
        except ValidationError:
            return values
        shape = _data_shape(model, deepspeed, scaling)
        return {**values, "data": {**{name: value for name, (value, _) in shape.items()}, **data}}

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        problems = _cross_field_problems(self)
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step across all workers: the paper's 32,768 for the big recipes."""
        return _global_batch(self.deepspeed, self.scaling)

    def accumulation_chunks(self, world_size: int) -> int:
        """Chunks per step on ``world_size`` workers (the same on every rank, as DeepSpeed counts backward calls).

        With a fixed global batch (an elastic range, or ``deepspeed.global_batch_size``; checked for every
        count) enough chunks of at most ``micro_batch_size`` for the largest worker's share, else
        ``grad_accum_steps`` (a fixed worker count's batch grows with the workers, e.g. ``--resume`` on another
        count). The rule is ``orchestrator.batch_split.balanced_micro_batch``, the planner's too."""
        deepspeed = self.deepspeed
        if not self._fixed_global_batch:
            return deepspeed.grad_accum_steps
        return balanced_micro_batch(max(self.worker_batch_sizes(world_size)), deepspeed.micro_batch_size)[1]

    def worker_batch_sizes(self, world_size: int) -> list[int]:
        """Samples each of ``world_size`` workers trains on per step, by rank.

        A fixed global batch is split as evenly as it goes (``orchestrator.batch_split.worker_shares``): ranks
        below ``global % world_size`` take one sample more (the loss weights each rank by its share, so the
        step is still the global-batch one).
        """
        if not self._fixed_global_batch:
            return [self.deepspeed.grad_accum_steps * self.deepspeed.micro_batch_size] * world_size
        return worker_shares(self.global_batch_size, world_size)

    def worker_batch_size(self, world_size: int, rank: int) -> int:
        """Samples worker ``rank`` of ``world_size`` trains on per step."""
        return self.worker_batch_sizes(world_size)[rank]

    def describe_batch_plan(self, world_size: int) -> str:
        """The step's split for a log line: ``3 x 8 x 2 chunks`` (whole micro-batches) or else the shares,
        ``129 x 254-255 samples in 2 chunk(s)``."""
        sizes, chunks = self.worker_batch_sizes(world_size), self.accumulation_chunks(world_size)
        if sizes == [chunks * self.deepspeed.micro_batch_size] * world_size:
            return f"{world_size} x {self.deepspeed.micro_batch_size}" + (f" x {chunks} chunks" if chunks > 1 else "")
        share = f"{min(sizes)}-{max(sizes)}" if min(sizes) != max(sizes) else f"{sizes[0]}"
        return f"{world_size} x {share} samples in {chunks} chunk(s)"

    @property
    def _fixed_global_batch(self) -> bool:
        return self.deepspeed.global_batch_size is not None or self.scaling.elastic

    @property
    def precision(self) -> Literal["bf16", "fp32"]:
        """The resolved precision: ``auto`` is bf16 on GPU, fp32 on CPU."""
        if self.deepspeed.precision == "auto":
            return "bf16" if self.scaling.use_gpu else "fp32"
        return self.deepspeed.precision

    def eval_sets(self) -> list[EvalSetConfig]:
        """The sets evaluated during pretraining: the held-out split (as ``heldout``) and ``eval.sets``."""
        if not self.eval.enabled:
            return []
        sets = list(self.eval.sets)
        if self.eval.heldout and self.data.heldout_url is not None:
            sets.insert(0, EvalSetConfig(name=HELDOUT_SET, data=self.data.heldout_url, layout="rayclip",
                                         every_steps=self.eval.every_steps, templates=self.eval.templates,
                                         max_images=self.eval.max_images))
        return sets

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


def _global_batch(deepspeed: DeepSpeedConfig, scaling: ScalingSection) -> int:
    if deepspeed.global_batch_size is not None:
        return deepspeed.global_batch_size
    return deepspeed.micro_batch_size * deepspeed.grad_accum_steps * scaling.max_workers


def _data_shape(model: ModelConfig, deepspeed: DeepSpeedConfig, scaling: ScalingSection) -> dict[str, tuple[int, str]]:
    """What the data stream must produce for the model and the batch plan: field -> (value, its source)."""
    spec = model.spec()
    return {
        "image_size": (spec.vision.image_size, "the model's input size (model.name / model.image_size)"),
        "context_length": (spec.text.context_length, "the model's text context (model.context_length)"),
        "batch_size": (
            max(1, _global_batch(deepspeed, scaling) // scaling.max_workers),
            "the global batch / the (largest) worker count, rounded down (samples per worker per step)",
        ),
    }


def _batch_plan_problems(cfg: RunConfig) -> list[str]:
    """At every worker count the run may have, every worker's share of the global batch must fill the step's chunks."""
    deepspeed, scaling, total = cfg.deepspeed, cfg.scaling, cfg.global_batch_size
    if deepspeed.global_batch_size is None:
        if not scaling.elastic:
            return []
        source = (f"the global batch {total} (micro_batch_size {deepspeed.micro_batch_size} x grad_accum_steps "
                  f"{deepspeed.grad_accum_steps} x {scaling.max_workers} workers)")
    else:
        source = f"deepspeed.global_batch_size={total}"
        implied = _chunks(total, scaling.max_workers, deepspeed.micro_batch_size)
        if deepspeed.grad_accum_steps not in (1, implied):
            return [f"deepspeed.grad_accum_steps={deepspeed.grad_accum_steps} disagrees with {source}: the chunks "
                    f"follow from it ({implied} at {scaling.max_workers} workers); allowed: 1 (unset) or {implied}"]
    failing = [n for n in scaling.worker_counts
               if min(worker_shares(total, n)) < _chunks(total, n, deepspeed.micro_batch_size)]
    if not failing:
        return []
    if deepspeed.micro_batch_size == 1:  # one-sample chunks: a worker one sample short runs out of chunks
        allowed = (f"micro_batch_size 2 or more, or a global batch that every count divides (a multiple of "
                   f"{math.lcm(*scaling.worker_counts)})")
    else:
        allowed = f"a global batch of at least {scaling.max_workers}, or a smaller worker range"
    return [f"{source} cannot be split over scaling.num_workers={_plain(scaling.num_workers)}: with {failing} workers "
            "some worker would hold fewer samples than the step's chunks (every worker runs as many as the largest "
            f"share needs); allowed: {allowed}"]


def _chunks(global_batch: int, world_size: int, micro_batch: int) -> int:
    return balanced_micro_batch(max(worker_shares(global_batch, world_size)), micro_batch)[1]


def _plain(value) -> str:
    return f"[{value[0]}, {value[1]}]" if isinstance(value, tuple) else str(value)


def _data_shape_problems(cfg: RunConfig) -> list[str]:
    """An explicit ``data`` value that disagrees with the model or the batch plan (see ``_data_follows_the_model``)."""
    problems = []
    for name, (value, meaning) in _data_shape(cfg.model, cfg.deepspeed, cfg.scaling).items():
        if getattr(cfg.data, name) != value:
            problems.append(f"data.{name}={getattr(cfg.data, name)} must equal {meaning} = {value}; allowed: {value} or unset")
    return problems


def _cross_field_problems(cfg: RunConfig) -> list[str]:
    """Constraints between sections, each message naming the fields involved and what is allowed."""
    problems = _batch_plan_problems(cfg) or _data_shape_problems(cfg)
    if cfg.eval.enabled and cfg.eval.heldout and cfg.data.heldout_url is None:
        problems.append("eval.heldout=true needs data.heldout (a labelled split) when the training shards are not "
                        "one folder; allowed: set data.heldout, or eval.heldout=false (eval.sets still run)")
    if cfg.eval.enabled and cfg.eval.heldout and any(s.name == HELDOUT_SET for s in cfg.eval.sets):
        problems.append(f"eval.sets: the name {HELDOUT_SET!r} is the held-out split's (eval.heldout=true); "
                        "allowed: another name, or eval.heldout=false")
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
    if cfg.model.patch_dropout_off_last_steps > cfg.schedule.total_steps:
        problems.append(f"model.patch_dropout_off_last_steps={cfg.model.patch_dropout_off_last_steps} exceeds "
                        f"schedule.total_steps={cfg.schedule.total_steps}; allowed: 0..total_steps")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        problems.append("deepspeed.offload_optimizer=true needs deepspeed.zero_stage 1, 2 or 3 (got 0)")
    problems += _tune_problems(cfg)
    if cfg.checkpoint.s3_endpoint_url and not cfg.checkpoint.storage_path.startswith("s3://"):
        problems.append(
            f"checkpoint.s3_endpoint_url is set but checkpoint.storage_path={cfg.checkpoint.storage_path!r} "
            "is not an s3:// URL"
        )
    return problems


def _tune_problems(cfg: RunConfig) -> list[str]:
    """Every search-space path must be a run-config field that takes each candidate value; the metric must
    be one an evaluation set reports, early enough for ASHA."""
    tune = cfg.tune
    if tune is None:
        return []
    problems = []
    base = cfg.model_dump(mode="json", exclude={"tune"})
    for path, distribution in tune.search_space.items():
        where = f"tune.search_space.{path}"
        if not _is_field_path(path):
            problems.append(f"{where}: no such run-config field; allowed: a dotted path like optim.lr, "
                            "loss.init_temperature or schedule.warmup_steps")
            continue
        for value in distribution.candidates():
            data = copy.deepcopy(base)
            set_dotted(data, path, value)
            try:
                RunConfig.model_validate(data)
            except ValidationError as error:
                reason = format_validation_error(error, data).splitlines()[1].strip()
                problems.append(f"{where}: the value {value!r} is not allowed ({reason})")
    problems += _tune_metric_problems(cfg)
    return problems


def _is_field_path(path: str) -> bool:
    section: type[BaseModel] = RunConfig
    *parents, leaf = path.split(".")
    for part in parents:
        annotation = section.model_fields[part].annotation if part in section.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        section = annotation
    return leaf in section.model_fields and path not in ("name", "tune")


def _tune_metric_problems(cfg: RunConfig) -> list[str]:
    tune = cfg.tune
    if not tune.metric.startswith("eval/"):
        return []
    _, set_name, metric = tune.metric.split("/", 2)
    sets = {eval_set.name: eval_set for eval_set in cfg.eval_sets()}
    if set_name not in sets:
        return [f"tune.metric={tune.metric!r}: no evaluation set {set_name!r}; allowed sets: "
                f"{', '.join(sets) or 'none (eval.enabled / eval.heldout / eval.sets)'}"]
    eval_set = sets[set_name]
    if metric not in metric_of_task(eval_set.task):
        return [f"tune.metric={tune.metric!r}: set {set_name!r} (task {eval_set.task}) reports "
                f"{', '.join(metric_of_task(eval_set.task))}"]
    if tune.scheduler == "asha" and not eval_set.every_steps:
        field = "eval.every_steps" if set_name == HELDOUT_SET else f"eval.sets[{set_name}].every_steps"
        return [f"tune.metric={tune.metric!r}: ASHA compares trials while they run, so the set needs a period: "
                f"set {field} (or tune.scheduler=fifo)"]
    return []


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
    """The keys of the section at ``location`` (``("eval", "sets", 0)``: an entry of a list of sections)."""
    section: type[BaseModel] = RunConfig
    for part in location:
        if isinstance(part, int):  # an index into a list of sections: the section is the list's item type
            continue
        annotation = section.model_fields[part].annotation
        if typing.get_origin(annotation) is list:
            annotation = typing.get_args(annotation)[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        section = annotation
    return list(section.model_fields)
