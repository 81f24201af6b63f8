"""What the search's driver sees of its trials: a line per event, and each trial's MLflow run given its outcome.

A trial's own pretraining run (opened by its rank 0, nested under the search's run by ``mlflow.parentRunId``)
closes itself when it finishes or fails. A trial that ASHA stops is killed with its workers and cannot close
its run, and a failed one cannot say why in a way the MLflow UI shows: this Tune callback, in the driver,
does both (status, and the tags ``rayclip.trial_outcome`` / ``rayclip.failure``).
"""

from __future__ import annotations

import os
import statistics
import time

from ray.tune import Callback

from orchestrator.logs import duration, get_logger
from orchestrator.runs import FIRST_STEP_AT
from orchestrator.tune.space import flat_params, short_value
from orchestrator.tune.trial import TRIAL_TAG

logger = get_logger("tune")
OUTCOME_TAG = "rayclip.trial_outcome"
FAILURE_TAG = "rayclip.failure"


def failure_reason(error_text: str) -> str:
    """The line of a trial's traceback that says what went wrong (the last ``...Error: ...`` line)."""
    lines = [line.strip() for line in error_text.splitlines() if line.strip()]
    named = [line for line in lines if "Error: " in line or "Exception: " in line]
    return (named or lines or ["unknown error"])[-1][:500]


class TrialTracking(Callback):
    """Tune callback (runs in the search's driver): progress lines, and each trial's MLflow outcome."""

    def __init__(self, *, search_name: str, tracking_uri: str, experiment: str, metric: str, time_attr: str,
                 max_t: int):
        self.search_name, self.tracking_uri, self.experiment = search_name, tracking_uri, experiment
        self.metric, self.time_attr, self.max_t = metric, time_attr, max_t
        self.last: dict[str, dict] = {}
        self.started: dict[str, float] = {}  # trial id -> when Tune started it (this driver's trials only)
        self.start_cost: dict[str, float] = {}  # trial id -> seconds from its start to its first step
        self.life: dict[str, float] = {}  # trial id -> seconds from its start to its end

    def _name(self, trial) -> str:
        return f"{self.search_name}-{trial.trial_id}"

    def on_trial_start(self, iteration, trials, trial, **info):
        params = ", ".join(f"{path}={short_value(value)}" for path, value in flat_params(trial.config).items())
        logger.info("trial %s started: %s", self._name(trial), params)
        self.started[trial.trial_id] = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = result
        started = self.started.get(trial.trial_id)
        if started is not None and trial.trial_id not in self.start_cost and FIRST_STEP_AT in result:
            self.start_cost[trial.trial_id] = result[FIRST_STEP_AT] - started
            logger.info("trial %s reached its first step %s after it started", self._name(trial),
                        duration(self.start_cost[trial.trial_id]))
        if self.metric in result:
            logger.info("trial %s at %s %s: %s %.4f", self._name(trial), self.time_attr, result.get(self.time_attr),
                        self.metric, result[self.metric])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)
        reached = self.last.get(trial.trial_id, {}).get(self.time_attr, 0)
        if reached >= self.max_t:
            logger.info("trial %s finished", self._name(trial))
            self._mark(trial, None, {OUTCOME_TAG: "finished"})
            return
        logger.info("trial %s stopped early by ASHA at %s %s; its workers are released", self._name(trial),
                    self.time_attr, reached)
        self._mark(trial, "KILLED", {OUTCOME_TAG: f"stopped early by ASHA at {self.time_attr} {reached}"})

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial)
        reason = failure_reason(_error_text(trial))
        logger.warning("trial %s failed: %s", self._name(trial), reason)
        self._mark(trial, "FAILED", {OUTCOME_TAG: "failed", FAILURE_TAG: reason})

    def _ended(self, trial) -> None:
        if trial.trial_id in self.started:
            self.life[trial.trial_id] = time.time() - self.started[trial.trial_id]

    def on_experiment_end(self, trials, **info):
        """One line: how much of its trials' lives this search spent starting them."""
        measured = [trial_id for trial_id in self.start_cost if trial_id in self.life]
        if not measured:
            return
        starting = sum(self.start_cost[t] for t in measured)
        living = sum(self.life[t] for t in measured)
        logger.info("%d trial(s) spent %s of their %s starting (%d%%): %s a trial to its first step (median)",
                    len(measured), duration(starting), duration(living), round(100 * starting / max(living, 1e-9)),
                    duration(statistics.median(self.start_cost[t] for t in measured)))

    def _mark(self, trial, status: str | None, tags: dict[str, str]) -> None:
        """Tag the trial's MLflow run (found by its ``rayclip.trial`` tag) and set its status."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            client = MlflowClient(self.tracking_uri)
            experiment = client.get_experiment_by_name(self.experiment)
            runs = client.search_runs([experiment.experiment_id], f"tags.`{TRIAL_TAG}` = '{self._name(trial)}'")
            for run in runs:
                for key, value in tags.items():
                    client.set_tag(run.info.run_id, key, value)
                if status is not None:
                    client.set_terminated(run.info.run_id, status=status)
        except (MlflowException, OSError, AttributeError) as error:  # tracking never stops a search
            logger.warning("could not record trial %s in MLflow at %s: %s", self._name(trial), self.tracking_uri, error)


def _error_text(trial) -> str:
    """The trial's error trace: the driver's copy (written before this callback runs), else storage's."""
    if trial.error_file and os.path.exists(trial.error_file):
        with open(trial.error_file) as handle:
            return handle.read()
    error = trial.get_error()
    return str(error) if error is not None else ""
