"""One trial of a search: a real pretraining run (runs in the Ray Tune trial actor).

Ray Train v2 has no ``Tuner(trainer)``: the supported pattern is a Tune function trainable that builds and
fits the ``TorchTrainer`` itself, with ``TuneReportCallback`` in the Train run config forwarding rank 0's
reports to Tune. Every trial is the run config with its sampled values set at their dotted paths, trained
by the same ``build_trainer`` as ``jobs/pretrain.py``: its own DeepSpeed workers, checkpoints and data stream.
The Train run is named after the trial (``<search>-<trial id>``), so a trial restarted by ``Tuner.restore``
finds its own checkpoint and MLflow run and continues them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from orchestrator.config import RunConfig, set_dotted

PARENT_TAG = "mlflow.parentRunId"  # MLflow nests a run under the run this tag names
SEARCH_TAG = "rayclip.search"
TRIAL_TAG = "rayclip.trial"


@dataclass(frozen=True)
class SearchInfo:
    """What every trial needs to know about its search (travels to the trial actors)."""

    name: str
    base: dict
    """The run config (``tune`` section removed) as a plain dict."""
    parent_run_id: str | None
    runs_storage: str
    """Where the trials' Train runs live: ``<checkpoint.storage_path>/<search>/runs``."""


def trial_config(search: SearchInfo, params: dict[str, Any], trial_id: str) -> RunConfig:
    """The run config of one trial: the base with ``params`` (dotted path -> value) set."""
    data = copy.deepcopy(search.base)
    for path, value in params.items():
        set_dotted(data, path, value)
    name = f"{search.name}-{trial_id}"
    data["name"] = name
    data["checkpoint"]["storage_path"] = search.runs_storage
    tags = {**data["tracking"].get("tags", {}), SEARCH_TAG: search.name, TRIAL_TAG: name}
    if search.parent_run_id:
        tags[PARENT_TAG] = search.parent_run_id
    data["tracking"].update(run_name=name, tags=tags, register_model_name=None)
    return RunConfig.from_dict(data)


def run_trial(params: dict[str, Any], *, search: SearchInfo) -> None:
    """Tune's function trainable: fit the trial's ``TorchTrainer``; its reports reach Tune through the callback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.train import build_trainer
    from orchestrator.tune.space import flat_params

    cfg = trial_config(search, flat_params(params), tune.get_context().get_trial_id())
    build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()  # raises when the run fails: the trial errors
