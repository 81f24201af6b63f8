"""The tune section and the search's pieces that need no cluster: validation that names the field, the search
space in Ray Tune's terms and back, a trial's run config, the failure line, and the best config's YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray import tune

from orchestrator.config import ConfigError, RunConfig, load_config
from orchestrator.tune import (
    PARENT_TAG,
    TRIAL_TAG,
    Search,
    SearchInfo,
    best_config_yaml,
    failure_reason,
    flat_params,
    param_space,
    trial_config,
)
from orchestrator.storage import resolve

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SPACE = "tune.search_space={optim.lr: {kind: loguniform, low: 1.0e-4, high: 1.0e-2}}"


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    return str(caught.value)


@pytest.mark.parametrize("recipe", ["tune_local.yaml", "tune_vit_b32.yaml"])
def test_shipped_tune_configs_validate(recipe):
    cfg = load_config(CONFIGS / recipe)
    assert cfg.tune is not None and {"optim.lr", "loss.init_temperature"} <= set(cfg.tune.search_space)
    assert cfg.tune.scheduler == "asha" and cfg.tune.resolved_mode == "max"


@pytest.mark.parametrize("overrides, named", [
    (["tune.search_space={optim.lrr: {kind: choice, values: [1]}}"], "tune.search_space.optim.lrr: no such run-config field"),
    (["tune.search_space={loss.init_temperature: {kind: choice, values: [0.07, 2.0]}}"],
     "tune.search_space.loss.init_temperature: the value 2.0 is not allowed"),
    (["tune.search_space={schedule.kind: {kind: grid, values: [cosine, exponential]}}"],
     "tune.search_space.schedule.kind: the value 'exponential' is not allowed"),
    (["tune.search_space={optim.lr: {kind: loguniform, low: 0, high: 1}}"], "loguniform needs low > 0"),
    (["tune.search_space={optim.lr: {kind: uniform, low: 1, high: 1}}"], "low=1.0 must be below high=1.0"),
    (["tune.search_space={optim.lr: {kind: choice, low: 1, high: 2}}"], "takes a non-empty 'values' list"),
    ([SPACE, "tune.metric=accuracy"], "tune.metric"),
    ([SPACE, "tune.metric=eval/imagenet/zeroshot_top1"], "no evaluation set 'imagenet'; allowed sets: heldout"),
    ([SPACE, "tune.metric=eval/heldout/linear_probe_top1"], "reports zeroshot_top1, zeroshot_top5"),
    ([SPACE, "eval.every_steps=null"], "set eval.every_steps (or tune.scheduler=fifo)"),
    ([SPACE, "tune.search=optuna", "tune.search_space={optim.lr: {kind: grid, values: [1.0e-3]}}"],
     "search 'optuna' cannot take 'grid' entries"),
])
def test_a_bad_search_names_the_field(overrides, named):
    assert named in _error(overrides)


def test_mode_follows_the_metric_unless_set():
    assert load_config(None, [SPACE]).tune.resolved_mode == "max"
    loss = ["eval.sets=[{name: loss, data: /x, task: contrastive-loss, every_steps: 10}]",
            "tune.metric=eval/loss/contrastive_loss", SPACE]
    assert load_config(None, loss).tune.resolved_mode == "min"
    assert load_config(None, [*loss, "tune.mode=max"]).tune.resolved_mode == "max"


def test_param_space_nests_paths_and_flat_params_undoes_it():
    cfg = load_config(None, ["tune.search_space={optim.lr: {kind: loguniform, low: 1.0e-4, high: 1.0e-2}, "
                             "schedule.warmup_steps: {kind: randint, low: 10, high: 12}, "
                             "loss.learn_temperature: {kind: grid, values: [true, false]}}"])
    space = param_space(cfg.tune)
    assert isinstance(space["optim"]["lr"], tune.search.sample.Float)
    assert space["loss"]["learn_temperature"] == {"grid_search": [True, False]}
    warmups = {space["schedule"]["warmup_steps"].sample() for _ in range(200)}
    assert warmups == {10, 11, 12}  # randint includes high (Tune's own excludes it)
    nested = {"optim": {"lr": 0.001}, "schedule": {"warmup_steps": 11}}
    assert flat_params(nested) == {"optim.lr": 0.001, "schedule.warmup_steps": 11}


def test_a_trial_is_the_base_config_with_its_values_named_and_nested_under_the_search(tmp_path):
    base = load_config(None, ["tracking.register_model_name=clip"]).model_dump(mode="json", exclude={"tune"})
    search = SearchInfo("rayclip-tune-20260101-000000", base, "parent123", str(tmp_path / "runs"))
    cfg = trial_config(search, {"optim.lr": 0.004, "loss.init_temperature": 0.05}, "abc_00002")
    assert cfg.optim.lr == 0.004 and cfg.loss.init_temperature == 0.05
    assert cfg.name == cfg.tracking.run_name == "rayclip-tune-20260101-000000-abc_00002"
    assert cfg.checkpoint.storage_path == str(tmp_path / "runs")
    assert cfg.tracking.tags[PARENT_TAG] == "parent123" and cfg.tracking.tags[TRIAL_TAG] == cfg.name
    assert cfg.tracking.register_model_name is None  # trials do not fill the model registry
    assert base["optim"]["lr"] != 0.004  # the base is not changed


def test_failure_reason_is_the_error_line_of_the_trace():
    trace = ("Traceback (most recent call last):\n  File \"x.py\", line 1\nray.train.WorkerGroupError: Training failed\n"
             "  File \"worker_loop.py\"\norchestrator.train.worker_loop.NonFiniteLossError: 5 consecutive steps had a NaN\n")
    assert failure_reason(trace).startswith("orchestrator.train.worker_loop.NonFiniteLossError: 5 consecutive")
    assert failure_reason("") == "unknown error"


def test_best_config_is_a_run_config_with_the_best_values(tmp_path):
    cfg = load_config(CONFIGS / "tune_local.yaml")
    search = Search("rayclip-tune-20260101-000000", resolve(str(tmp_path)), cfg)
    text = best_config_yaml(search, {"optim.lr": 0.0042, "schedule.kind": "linear"})
    assert text.startswith("# The best trial of search rayclip-tune-20260101-000000")
    body = yaml.safe_load(text)
    assert "tune" not in body and body["name"] == "rayclip-tune-20260101-000000-best"
    best = RunConfig.from_dict(body)
    assert best.optim.lr == 0.0042 and best.schedule.kind == "linear" and best.tune is None
    assert best.model == cfg.model and best.data == cfg.data


def test_each_trials_start_and_the_searchs_share_of_starting_are_printed(caplog, monkeypatch):
    import logging
    from types import SimpleNamespace

    from orchestrator.runs import FIRST_STEP_AT
    from orchestrator.tune.trial_tracking import TrialTracking
    from tests.factories import rayclip_records

    clock = [1000.0]
    monkeypatch.setattr("orchestrator.tune.trial_tracking.time.time", lambda: clock[0])
    monkeypatch.setattr(TrialTracking, "_mark", lambda *args: None)  # MLflow is another test's
    tracking = TrialTracking(search_name="s", tracking_uri="sqlite:///unused.db", experiment="e", metric="loss",
                             time_attr="step", max_t=8)
    fast, slow = SimpleNamespace(trial_id="00000", config={}), SimpleNamespace(trial_id="00001", config={})
    with rayclip_records(caplog, logging.INFO) as records:
        tracking.on_trial_start(0, [], fast)
        tracking.on_trial_start(0, [], slow)
        tracking.on_trial_result(0, [], fast, {"step": 4, "loss": 2.0, FIRST_STEP_AT: 1030.0})
        tracking.on_trial_result(0, [], fast, {"step": 8, "loss": 1.0, FIRST_STEP_AT: 1090.0})  # a restart: not a start
        tracking.on_trial_result(0, [], slow, {"step": 4, "loss": 3.0, FIRST_STEP_AT: 1050.0})
        clock[0] = 1100.0
        tracking.on_trial_complete(0, [], fast)
        tracking.on_trial_complete(0, [], slow)
        tracking.on_experiment_end([])
    lines = [record.getMessage() for record in records]
    assert "trial s-00000 reached its first step 30 s after it started" in lines
    assert "trial s-00001 reached its first step 50 s after it started" in lines
    assert lines[-1] == ("2 trial(s) spent 1 min 20 s of their 3 min 20 s starting (40%): 40 s a trial to its "
                         "first step (median)")
