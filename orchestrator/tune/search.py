"""A Ray Tune search over pretraining runs (the driver of ``jobs/tune.py``).

The search is a Tune experiment under ``<checkpoint.storage_path>/<search name>/`` (Tune's state, and the
trials' Train runs under ``runs/``) with one MLflow run of its own, which every trial's pretraining run is
nested under. ``rayclip_search.json`` beside Tune's state keeps what a resumed driver needs (the config and the
MLflow run), so ``jobs/tune.py --resume <name>`` continues a search whose driver died: ``Tuner.restore``
keeps finished trials and restarts unfinished ones from their own checkpoints.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from orchestrator import runs, storage
from orchestrator.config import ConfigError, RunConfig
from orchestrator import noise
from orchestrator.logs import get_logger
from orchestrator.tune.space import param_space
from orchestrator.tune.trial import SearchInfo, run_trial
from orchestrator.tune.trial_tracking import TrialTracking

logger = get_logger("tune")
STATE_FILE = "rayclip_search.json"
TRIAL_DRIVER_CPUS = 0.01  # a trial's own actor only waits on its TorchTrainer, whose workers reserve their own
STOPPED_TRIAL_GRACE_S = 5  # how long a stopped trial's actor gets before Tune kills it (and its Train run)


@dataclass
class Search:
    """A search about to run (or resume): its name, where it lives, its config, and its MLflow run."""

    name: str
    folder: storage.Location
    cfg: RunConfig
    parent_run_id: str | None = None
    resumed: bool = False

    @property
    def info(self) -> SearchInfo:
        base = self.cfg.model_dump(mode="json", exclude={"tune"})
        return SearchInfo(self.name, base, self.parent_run_id, self.folder.child("runs").url)


def name_search(cfg: RunConfig, resume: str | None) -> Search:
    """A new search ``<tune.name>-<UTC time>-<random>`` with its folder reserved (no two searches share one, see
    ``runs.reserve``), or the one ``resume`` names, with its saved config. The tracking store must answer unless
    ``tracking.required`` is false. Raises :class:`ConfigError` (exit 2) before Ray starts."""
    from orchestrator.train import check_tracking

    check_tracking(cfg, "search without tracking")
    root = runs.storage_root(cfg.checkpoint.storage_path, cfg.checkpoint.s3_endpoint_url)
    if resume is None:
        name = runs.unique_run_name(cfg.tune.name)
        try:
            runs.reserve(root.child(name), {"name": name, "kind": "search"})
        except runs.RunFolderTaken:
            raise ConfigError(f"a folder {root.child(name).url} exists already: a new search never writes into "
                              f"another's; continue that one with --resume {name}") from None
        return Search(name, root.child(name), cfg)
    folder = root.child(resume)
    try:
        state = json.loads(storage.read_bytes(folder.child(STATE_FILE)))
    except FileNotFoundError:
        raise ConfigError(f"--resume {resume!r}: no search at {folder.url} (check checkpoint.storage_path and the "
                          "search name the first job printed)") from None
    return Search(resume, folder, RunConfig.from_dict(state["config"]), state.get("parent_run_id"), resumed=True)


def _open_parent_run(search: Search) -> None:
    """The search's own MLflow run (reopened on resume); its id is saved with the search's state."""
    from orchestrator.tracking import RunTracker

    cfg = search.cfg
    tracker = RunTracker.from_config(cfg.tracking, register_model_name=None, system_metrics=False)
    search.parent_run_id = tracker.start(cfg.model_dump(mode="json"), cfg.to_yaml(), run_name=search.name,
                                         resume_run_id=search.parent_run_id, tags={"rayclip.kind": "tune-search"})
    state = {"config": cfg.model_dump(mode="json"), "parent_run_id": search.parent_run_id}
    storage.write_bytes(search.folder.child(STATE_FILE), json.dumps(state, indent=1).encode())


def _search_algorithm(cfg: RunConfig):
    section = cfg.tune
    if section.search != "optuna":
        return None  # Tune's default: random sampling, with grid entries expanded
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=section.metric, mode=section.resolved_mode, seed=section.seed)


def _scheduler(cfg: RunConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    section = cfg.tune
    if section.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr=section.time_attr, max_t=section.budget(cfg.schedule.total_steps, cfg.global_batch_size),
                         grace_period=section.grace_period, reduction_factor=section.reduction_factor)


def build_tuner(search: Search):
    """Tune's ``Tuner`` for a new search, or ``Tuner.restore`` of the named one."""
    from ray import tune

    cfg, section = search.cfg, search.cfg.tune
    trainable = tune.with_resources(tune.with_parameters(run_trial, search=search.info), {"CPU": TRIAL_DRIVER_CPUS})
    root = runs.storage_root(cfg.checkpoint.storage_path, cfg.checkpoint.s3_endpoint_url)
    if search.resumed:
        return tune.Tuner.restore(search.folder.path, trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False, storage_filesystem=root.fs if root.is_s3 else None)
    tracking = TrialTracking(search_name=search.name, tracking_uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
                             metric=section.metric, time_attr=section.time_attr,
                             max_t=section.budget(cfg.schedule.total_steps, cfg.global_batch_size))
    return tune.Tuner(
        trainable,
        param_space=param_space(section),
        tune_config=tune.TuneConfig(metric=section.metric, mode=section.resolved_mode, num_samples=section.num_samples,
                                    search_alg=_search_algorithm(cfg), scheduler=_scheduler(cfg),
                                    max_concurrent_trials=section.max_concurrent_trials),
        run_config=tune.RunConfig(name=search.name, storage_path=root.path, storage_filesystem=root.fs if root.is_s3 else None,
                                  callbacks=[tracking], verbose=0,
                                  # a trial that fails (NaN loss, lost workers past checkpoint.max_failures) stays failed
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def run_search(search: Search):
    """Open (or reopen) the search's MLflow run, run every trial, and return Tune's ``ResultGrid``."""
    # The metric's set reports at its own period and checkpoints report in between: a report may lack it.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # A trial that ASHA stops is asked to stop, but its thread is blocked in TorchTrainer.fit(), so its Train
    # run would go on (holding its workers) until Tune kills the trial actor, by default 600 s later (the
    # Tune + Train v2 issue, ray #54305). Killed sooner, the trial's Train controller dies with it (its
    # owner), its workers with the controller, and Ray Train's placement-group cleaner frees their resources.
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", str(STOPPED_TRIAL_GRACE_S))
    noise.install(noise.TUNE_DRIVER)  # TrialTracking prints every trial's start, reports and outcome instead
    _open_parent_run(search)
    section = search.cfg.tune
    logger.info("search %s%s: %d samples over %s, %s on %s (%s), %d trial(s) at a time; state in %s",
                search.name, " resumed" if search.resumed else "", section.num_samples,
                ", ".join(section.search_space), section.scheduler.upper(), section.metric, section.resolved_mode,
                section.max_concurrent_trials, search.folder.url)
    return build_tuner(search).fit()
