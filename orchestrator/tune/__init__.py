"""Ray Tune searches over pretraining runs: what ``jobs/tune.py`` and the tests may use.

Who runs what (module: process):

* ``search`` (the Tuner, resume, the search's MLflow run), ``trial_tracking`` (a Tune callback: progress
  lines, each trial's MLflow outcome), ``report`` (the table, best config, plots): the search's driver;
* ``trial``: each trial's Tune actor, which builds and fits the trial's ``TorchTrainer``;
* ``space``: both (the search space in Tune's terms, and back to dotted run-config paths).
"""

from orchestrator.tune.report import SearchSummary, TrialSummary, best_config_yaml, format_table, summarize
from orchestrator.tune.search import STATE_FILE, Search, build_tuner, name_search, run_search
from orchestrator.tune.space import flat_params, param_space
from orchestrator.tune.trial import PARENT_TAG, SEARCH_TAG, TRIAL_TAG, SearchInfo, run_trial, trial_config
from orchestrator.tune.trial_tracking import FAILURE_TAG, OUTCOME_TAG, TrialTracking, failure_reason

__all__ = [
    "FAILURE_TAG",
    "OUTCOME_TAG",
    "PARENT_TAG",
    "SEARCH_TAG",
    "STATE_FILE",
    "Search",
    "SearchInfo",
    "SearchSummary",
    "TRIAL_TAG",
    "TrialSummary",
    "TrialTracking",
    "best_config_yaml",
    "build_tuner",
    "failure_reason",
    "flat_params",
    "format_table",
    "name_search",
    "param_space",
    "run_search",
    "run_trial",
    "summarize",
    "trial_config",
]
