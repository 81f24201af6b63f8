"""``jobs/evaluate.py``'s driver: check everything, start Ray, evaluate each set, print, write JSON, log to MLflow.

Every input is checked before Ray starts (the model file or run, every set's layout, class names and splits),
so a mistake costs seconds, not a cluster. Results go to the terminal (a table, then one headline line per
set), to a JSON file, and to MLflow: into the training run when the model is a rayclip run or checkpoint
(at its step, beside the in-loop evaluations), else into a new run tagged with the model's source.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from orchestrator import runs
from orchestrator.config import EvalSetConfig, RunConfig
from orchestrator.eval import model_source
from orchestrator.eval.model_source import LoadedModel
from orchestrator.eval.pipeline import RayDataFeatures
from orchestrator.eval.results import EvalResult
from orchestrator.eval.sets import EvalSetError, as_template, describe, set_name_for
from orchestrator.eval.tasks import OpenedSet, open_set, run_task
from orchestrator.logs import get_logger
from orchestrator.ray_start import start_ray

logger = get_logger("eval")


@dataclass
class EvaluationOptions:
    """What ``jobs/evaluate.py`` was asked (its command-line flags, parsed in ``jobs.cli``)."""

    model: str
    task: str
    data: list[str]
    """Set folders, each ``PATH`` or ``NAME=PATH``."""
    templates: str | None = None
    """A file of templates (one per line) or a single template; overrides every set's own."""
    classnames: str | None = None
    layout: str = "auto"
    split: str = "test"
    train_split: str = "train"
    max_images: int | None = None
    max_train_images: int | None = None
    batch_size: int = 256
    encoders: int | None = None
    precision: str = "auto"
    output: str | None = None
    mlflow: bool = True
    seed: int = 0
    names: list[str] = field(default_factory=list)


def read_templates_option(value: str | None) -> list[str] | None:
    """``--templates``: a file of templates, one per line, or one template (``{}`` or ``{c}`` slot)."""
    if value is None:
        return None
    if os.path.isfile(value):
        lines = [line.strip() for line in Path(value).read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise EvalSetError(f"--templates {value}: the file holds no template")
        return [as_template(line, value) for line in lines]
    return [as_template(value, "--templates")]


def set_configs(options: EvaluationOptions) -> list[EvalSetConfig]:
    """One ``EvalSetConfig`` per ``--data`` (validated like ``eval.sets`` in a run config)."""
    templates = read_templates_option(options.templates)
    configs = []
    for entry in options.data:
        name, sep, path = entry.partition("=")
        if not sep or "/" in name:
            name, path = set_name_for(entry), entry
        try:
            configs.append(EvalSetConfig(
                name=name, data=path if "://" in path else os.path.abspath(path), task=options.task,
                layout=options.layout, split=options.split, train_split=options.train_split,
                classnames=options.classnames, templates=templates, max_images=options.max_images,
                max_train_images=options.max_train_images))
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in error.errors(include_url=False))
            raise EvalSetError(f"--data {entry}: {problems}") from None
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise EvalSetError(f"--data: two sets share a name ({', '.join(names)}); name them as NAME=PATH")
    return configs


def prepare(options: EvaluationOptions, cfg: RunConfig) -> tuple[LoadedModel, list[OpenedSet]]:
    """The model and the sets, every problem raised before any Ray time (``EvalSetError``,
    ``ModelSourceError``, ``ValueError`` for an ``--output`` that cannot be written)."""
    _check_output(options.output)
    sets = [_open(set_cfg, cfg.data.s3_endpoint_url) for set_cfg in set_configs(options)]
    for opened in sets:
        for split in (opened.train, opened.test):
            if split is not None:
                logger.info("%s", describe(split))
    loaded = model_source.load_model(options.model, cfg)
    logger.info("%s", model_source.describe(loaded))
    return loaded, sets


def _open(set_cfg: EvalSetConfig, endpoint_url: str | None) -> OpenedSet:
    try:
        return open_set(set_cfg, endpoint_url)
    except OSError as error:  # storage that cannot be read: an unreachable endpoint, no permission
        raise EvalSetError(f"--data {set_cfg.data}: cannot be read ({' '.join(str(error).split())})") from None


def _check_output(path: str | None) -> None:
    """``--output``: a file whose folder exists or can be made, and can be written to."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--output {path}: a folder; allowed: the path of the results JSON file")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--output {path}: its folder cannot be made ({error.strerror}); allowed: a writable "
                         "path") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--output {path}: its folder {folder} is not writable; allowed: a writable path")


def run_evaluation(options: EvaluationOptions, cfg: RunConfig, loaded: LoadedModel, sets: list[OpenedSet]) -> list[EvalResult]:
    """Evaluate on Ray, print the table and headlines, write the JSON, log to MLflow; the results."""
    import ray

    use_gpu, encoders, threads = _encoder_plan(options)
    start_ray(encoders * (1 if use_gpu else threads) + 1, what=f"{encoders} model actor(s) and the read tasks",
              shortfall_hint="start it with more --num-cpus, or pass --encoders 1")
    use_gpu, encoders, threads = _encoder_plan(options, ray.cluster_resources())
    bf16 = options.precision == "bf16" or (options.precision == "auto" and use_gpu)
    source = RayDataFeatures(loaded.model, encoders=encoders, batch_size=options.batch_size, use_gpu=use_gpu,
                             bf16=bf16, threads_per_encoder=threads)
    logger.info("encoding with %d model actor%s (%s%s)", encoders, "s" * (encoders > 1),
                "a GPU each" if use_gpu else f"CPU, {threads} threads each", ", bf16 autocast" if bf16 else "")
    results = []
    for opened in sets:
        started = time.monotonic()
        scale = float(loaded.model.logit_scale.detach().exp().clamp(max=loaded.model.spec.max_logit_scale).reshape(()))
        result = run_task(source, opened, logit_scale=scale, batch_size=options.batch_size, seed=options.seed)
        result.details["seconds"] = round(time.monotonic() - started, 2)
        results.append(result)
        if result.bad_samples:
            logger.warning("%s: %d bad samples skipped (%s)", result.set_name, sum(result.bad_samples.values()),
                           ", ".join(f"{kind} {count}" for kind, count in sorted(result.bad_samples.items())))
    path = write_results(results, loaded, options, cfg)
    print(format_table(results))
    print(f"results: {path}")
    if options.mlflow:
        where = log_to_mlflow(results, loaded, options, cfg, path)
        if where:
            print(f"MLflow: {where}")
    for result in results:
        print(result.headline)
    return results


def _encoder_plan(options: EvaluationOptions, resources: dict | None = None) -> tuple[bool, int, int]:
    """(GPU actors?, how many actors, torch threads each): a GPU each where the cluster has GPUs, else
    CPU actors with a few threads, leaving a CPU for the read tasks."""
    cpus = int((resources or {}).get("CPU", os.cpu_count() or 1))
    gpus = int((resources or {}).get("GPU", 0))
    if options.precision != "fp32" and gpus:
        return True, options.encoders or gpus, 1
    threads = max(1, min(4, (os.cpu_count() or 1)))
    return False, options.encoders or max(1, (cpus - 1) // threads), threads


def format_table(results: list[EvalResult]) -> str:
    """Every metric of every set, aligned."""
    rows = [("set", "task", "images", "metric", "value")]
    for result in results:
        for index, (name, value) in enumerate(result.metrics.items()):
            first = index == 0
            rows.append((result.set_name if first else "", result.task if first else "",
                         str(result.images) if first else "", name, f"{value:.4f}" if name != "linear_probe_C" else f"{value:.3g}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def write_results(results: list[EvalResult], loaded: LoadedModel, options: EvaluationOptions, cfg: RunConfig) -> str:
    """The results as JSON at ``--output`` (default ``<outputs>/eval/<model>-<UTC time>-<random>.json``: two
    evaluations started in the same second do not write one file)."""
    from orchestrator.config import output_base_dir

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = options.output or os.path.join(output_base_dir(), "outputs", "eval",
                                          f"{runs.unique_run_name(_model_label(loaded))}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    body = {"model": {"source": loaded.source, "kind": loaded.kind, "architecture": loaded.model.spec.name,
                      "step": loaded.step, "mlflow_run_id": loaded.mlflow_run_id},
            "task": options.task, "created_utc": stamp, "results": [result.to_json() for result in results]}
    with open(path, "w") as handle:
        json.dump(body, handle, indent=1)
    return os.path.abspath(path)


def _model_label(loaded: LoadedModel) -> str:
    parts = [part for part in loaded.source.rstrip("/").split("/") if part]
    label = parts[-1] if parts else "model"
    if label.endswith(".pt") and len(parts) > 1:
        label = parts[-2]
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in label)


def log_to_mlflow(results: list[EvalResult], loaded: LoadedModel, options: EvaluationOptions, cfg: RunConfig,
                  results_path: str) -> str | None:
    """Into the training run when the model has one in this store, else a new run; where it went."""
    from orchestrator.tracking import RunTracker

    tracker = RunTracker.from_config(cfg.tracking, register_model_name=None, system_metrics=False)
    step = loaded.step or 0
    if loaded.mlflow_run_id and tracker.attach(loaded.mlflow_run_id):
        where = f"training run {loaded.mlflow_run_id} (step {step}) at {cfg.tracking.uri}"
        owned = False
    else:
        settings = {"model": {"name": loaded.model.spec.name, "source": loaded.source, "kind": loaded.kind},
                    "evaluation": {"task": options.task, "sets": [r.set_name for r in results], "data": options.data,
                                   "templates": options.templates, "precision": options.precision}}
        tags = {"rayclip.kind": "evaluation", "rayclip.model_source": loaded.source}
        run_id = tracker.start(settings, yaml.safe_dump(settings, sort_keys=False), run_name=f"eval-{_model_label(loaded)}",
                               tags=tags)
        if run_id is None:
            return None
        where = f"evaluation run {run_id} in experiment {cfg.tracking.experiment!r} at {cfg.tracking.uri}"
        owned = True
    for result in results:
        tracker.log_evaluation(result, step)
    tracker.log_file(results_path, "eval")
    if owned:
        tracker.finish(None, status="FINISHED")
    return None if tracker.disabled else where
