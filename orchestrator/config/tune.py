"""The ``tune`` section: a Ray Tune search over any run-config field, named by its dotted path.

A tune config is a run config plus this section (``jobs/tune.py``); each trial is that run config with the
sampled values set at their paths. Paths and values are checked against the run config before Ray starts
(``orchestrator.config.run``), so a typo in a path or a value the field rejects names the search-space entry.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.config.sections import ConfigSection

_METRIC = re.compile(r"train/loss|eval/[A-Za-z0-9][A-Za-z0-9_.-]*/[a-z0-9_]+")


class Distribution(ConfigSection):
    """How one field is searched."""

    kind: Literal["choice", "grid", "uniform", "loguniform", "randint"]
    """choice: one of ``values`` at random; grid: every one of ``values`` (each trial sample is repeated per
    grid value); uniform / loguniform: a float in [low, high] (loguniform: uniform in log space); randint:
    an integer in [low, high]."""
    values: list[Any] | None = None
    """choice and grid: the candidate values."""
    low: float | None = None
    """uniform, loguniform, randint: the smallest value."""
    high: float | None = None
    """uniform, loguniform, randint: the largest value."""

    @model_validator(mode="after")
    def _complete(self) -> "Distribution":
        if self.kind in ("choice", "grid"):
            if not self.values or self.low is not None or self.high is not None:
                raise ValueError(f"kind {self.kind!r} takes a non-empty 'values' list (and no low/high)")
            return self
        if self.values is not None or self.low is None or self.high is None:
            raise ValueError(f"kind {self.kind!r} takes 'low' and 'high' (and no values)")
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")
        if self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")
        if self.kind == "randint" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError(f"randint needs whole low and high, got {self.low} and {self.high}")
        return self

    def candidates(self) -> list[Any]:
        """Values to check against the field: every listed value, or both ends of a range."""
        if self.values is not None:
            return list(self.values)
        if self.kind == "randint":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class TuneSection(ConfigSection):
    name: str = "rayclip-tune"
    """Search name: a UTC timestamp is appended; ``jobs/tune.py --resume`` takes the full name."""
    search_space: dict[str, Distribution]
    """Dotted run-config path -> distribution, e.g. ``optim.lr: {kind: loguniform, low: 1.0e-4, high: 3.0e-3}``."""
    metric: str = "eval/heldout/zeroshot_top1"
    """What trials are compared on: ``eval/<set>/<metric>`` of an evaluation set (``heldout`` is the training
    data's held-out split; ``contrastive_loss`` of a set with task ``contrastive-loss``), or ``train/loss``."""
    mode: Literal["max", "min"] | None = None
    """Whether larger is better; null: ``min`` for a loss, else ``max``."""
    num_samples: int = Field(default=4, gt=0)
    """Trials drawn from the space (each repeated for every combination of ``grid`` values)."""
    search: Literal["random", "optuna"] = "random"
    """random (and grid) sampling, or Optuna's TPE through Ray Tune's integration (no ``grid`` entries)."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha: stop trials early whose metric trails at a rung (async successive halving); fifo: run every
    trial to the end."""
    time_attr: Literal["step", "samples_seen"] = "step"
    """The unit of ASHA's rungs: optimizer steps or training samples seen."""
    grace_period: int = Field(default=1, gt=0)
    """ASHA: a trial runs at least this long (in ``time_attr`` units) before it can be stopped."""
    reduction_factor: float = Field(default=2.0, gt=1)
    """ASHA: at each rung only the best 1/reduction_factor of the trials go on."""
    max_concurrent_trials: int = Field(default=1, gt=0)
    """Trials running at once; each takes ``scaling.num_workers`` workers and their data stream."""
    seed: int | None = None
    """Seed of the search's sampling (random and Optuna); null draws a fresh one."""

    @field_validator("search_space")
    @classmethod
    def _not_empty(cls, space: dict[str, Distribution]) -> dict[str, Distribution]:
        if not space:
            raise ValueError("at least one dotted run-config path to search is needed")
        return space

    @field_validator("metric")
    @classmethod
    def _metric_shape(cls, metric: str) -> str:
        if not _METRIC.fullmatch(metric):
            raise ValueError("allowed: 'eval/<set name>/<metric>' (e.g. eval/heldout/zeroshot_top1) or 'train/loss'")
        return metric

    @model_validator(mode="after")
    def _search_fits_the_space(self) -> "TuneSection":
        if self.search == "optuna" and any(d.kind == "grid" for d in self.search_space.values()):
            raise ValueError("search 'optuna' cannot take 'grid' entries; allowed: choice, uniform, loguniform, randint")
        return self

    @property
    def resolved_mode(self) -> Literal["max", "min"]:
        return self.mode or ("min" if self.metric.endswith("loss") else "max")

    def budget(self, total_steps: int, global_batch: int) -> int:
        """ASHA's ``max_t``: the whole run in ``time_attr`` units."""
        return total_steps if self.time_attr == "step" else total_steps * global_batch


def metric_of_task(task: str) -> tuple[str, ...]:
    """The metric names an evaluation task reports (what ``tune.metric`` may name after ``eval/<set>/``)."""
    if task == "zeroshot":
        return ("zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class_recall")
    if task == "retrieval":
        return tuple(f"{direction}_recall_at_{k}" for direction in ("image_to_text", "text_to_image") for k in (1, 5, 10))
    if task == "linear-probe":
        return ("linear_probe_top1",)
    return ("contrastive_loss",)


def set_dotted(data: dict[str, Any], path: str, value: Any) -> None:
    """``data["optim"]["lr"] = value`` for ``path`` "optim.lr" (the sections must exist)."""
    *parents, leaf = path.split(".")
    for part in parents:
        data = data[part]
    data[leaf] = value

