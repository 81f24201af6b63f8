"""A finished search for people: the trials' table, the best config as ready-to-run YAML, plots, MLflow.

Runs in the search's driver after ``Tuner.fit``. The best trial is the one whose last reported metric is
best (trials stopped by ASHA report their last value too; failed trials do not count). The search's MLflow
run gets the best config (``best_config.yaml``), the best trial's metric over time (``best/<metric>``), the
trial counts, and plots: the metric against each searched number (temperature, learning rate, ...) and
every trial's curve.
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from orchestrator.config import RunConfig, set_dotted
from orchestrator.logs import get_logger
from orchestrator.tune.search import Search
from orchestrator.tune.space import flat_params, short_value

logger = get_logger("tune")


@dataclass
class TrialSummary:
    name: str
    params: dict
    outcome: str
    reached: float
    """How far it got, in the search's ``time_attr`` units."""
    metric: float | None
    curve: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class SearchSummary:
    trials: list[TrialSummary]
    best: TrialSummary | None
    best_config_yaml: str | None
    best_config_path: str | None


def summarize(grid, search: Search, output_dir: str) -> SearchSummary:
    """Every trial's outcome, the best config written to ``output_dir/best_config.yaml``, all logged to MLflow."""
    section = search.cfg.tune
    max_t = section.budget(search.cfg.schedule.total_steps, search.cfg.global_batch_size)
    trials = [_trial_summary(result, search, max_t) for result in grid]
    scored = [t for t in trials if t.metric is not None and math.isfinite(t.metric) and t.outcome != "failed"]
    sign = 1 if section.resolved_mode == "max" else -1
    best = max(scored, key=lambda t: sign * t.metric) if scored else None
    text, path = None, None
    if best is not None:
        text = best_config_yaml(search, best.params)
        path = str(Path(output_dir) / "best_config.yaml")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    summary = SearchSummary(trials, best, text, path)
    _log_to_parent(search, summary)
    return summary


def _trial_summary(result, search: Search, max_t: float) -> TrialSummary:
    section = search.cfg.tune
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.split("_")[-1]
    frame = result.metrics_dataframe
    curve = []
    if frame is not None and section.metric in frame and section.time_attr in frame:
        rows = frame[[section.time_attr, section.metric]].dropna()
        curve = [(float(t), float(v)) for t, v in zip(rows[section.time_attr], rows[section.metric])]
    reached = curve[-1][0] if curve else float((result.metrics or {}).get(section.time_attr, 0))
    if result.error is not None:
        outcome = "failed"
    elif reached >= max_t:
        outcome = "finished"
    else:
        outcome = "stopped early"
    return TrialSummary(f"{search.name}-{trial_id}", flat_params(result.config or {}), outcome, reached,
                        curve[-1][1] if curve else None, curve)


def best_config_yaml(search: Search, params: dict) -> str:
    """The base run config with the best trial's values: ``jobs/pretrain.py --config`` runs it as it is."""
    data = copy.deepcopy(search.cfg.model_dump(mode="json", exclude={"tune"}))
    for path, value in params.items():
        set_dotted(data, path, value)
    data["name"] = f"{search.name}-best"
    cfg = RunConfig.from_dict(data)  # the values were checked one by one; the combination is checked here
    header = (f"# The best trial of search {search.name} ({search.cfg.tune.metric}, {search.cfg.tune.resolved_mode}):\n"
              + "".join(f"#   {path}: {value}\n" for path, value in params.items())
              + "#   python jobs/pretrain.py --config <this file>\n")
    body = {key: value for key, value in cfg.model_dump(mode="json").items() if key != "tune"}
    return header + yaml.safe_dump(body, sort_keys=False)


def format_table(summary: SearchSummary, metric: str, time_attr: str) -> str:
    paths = sorted({path for trial in summary.trials for path in trial.params})
    rows = [("trial", *paths, "outcome", time_attr, metric)]
    for trial in summary.trials:
        rows.append((trial.name, *(short_value(trial.params.get(path)) for path in paths), trial.outcome,
                     f"{trial.reached:g}", "-" if trial.metric is None else f"{trial.metric:.4f}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)



def _log_to_parent(search: Search, summary: SearchSummary) -> None:
    from orchestrator.tracking import RunTracker, render_metric_vs_param, render_trial_curves

    section = search.cfg.tune
    tracker = RunTracker.from_config(search.cfg.tracking, register_model_name=None, system_metrics=False)
    if search.parent_run_id is None or not tracker.attach(search.parent_run_id):
        return
    counts = {outcome: sum(t.outcome == outcome for t in summary.trials) for outcome in ("finished", "stopped early", "failed")}
    tracker.log_metrics({f"trials/{outcome.replace(' ', '_')}": float(n) for outcome, n in counts.items()}, 0)
    if summary.best is not None:
        for step, value in summary.best.curve:
            tracker.log_metrics({f"best/{section.metric}": value}, int(step))
    with tempfile.TemporaryDirectory() as scratch:
        figures = {"trial_curves.png": render_trial_curves({t.name: t.curve for t in summary.trials if t.curve},
                                                            section.metric, section.time_attr)}
        for path in section.search_space:
            points = [(t.params[path], t.metric, t.outcome) for t in summary.trials
                      if t.metric is not None and isinstance(t.params.get(path), (int, float))]
            if points:
                log_x = section.search_space[path].kind == "loguniform"
                figures[f"metric_vs_{path}.png"] = render_metric_vs_param(points, path, section.metric, log_x=log_x)
        for name, figure in figures.items():
            figure.savefig(Path(scratch) / name, dpi=100)
            tracker.log_file(str(Path(scratch) / name), "search")
        if summary.best_config_path:
            tracker.log_file(summary.best_config_path)
    tracker.finish(None, status="FINISHED")
