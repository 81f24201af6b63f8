"""Ray Tune searches over pretraining runs: what ``jobs/tune.py`` and the tests may use.

Who runs what (module: process):

* ``search`` (the Tuner, resume, the search's MLflow run), ``trial_tracking`` (a Tune callback: progress
  lines, each trial's MLflow outcome), ``report`` (the table, best config, plots): the search's driver;
* ``trial``: each trial's Tune actor, which builds and fits the trial's ``TorchTrainer``;
* ``space``: both (the search space in Tune's terms, and back to dotted run-config paths).
"""

from orchestrator.facade import lazy_facade

__all__, __getattr__, __dir__ = lazy_facade(__name__, {
    ".report": ("SearchSummary", "TrialSummary", "best_config_yaml", "format_table", "summarize"),
    ".search": ("STATE_FILE", "Search", "build_tuner", "name_search", "run_search"),
    ".space": ("flat_params", "param_space"),
    ".trial": ("PARENT_TAG", "SEARCH_TAG", "TRIAL_TAG", "SearchInfo", "run_trial", "trial_config"),
    ".trial_tracking": ("FAILURE_TAG", "OUTCOME_TAG", "TrialTracking", "failure_reason"),
})
