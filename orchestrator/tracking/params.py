"""The run config as MLflow params: flattened to the dotted names ``--set`` takes, in MLflow's batch limits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlflow.entities import Param

MAX_PARAM_VALUE_CHARS = 6000  # MLflow rejects longer param values
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit for params
_TRUNCATION_MARK = "...[truncated]"


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into MLflow params: {"optim": {"lr": 3e-4}} -> {"optim.lr": "0.0003"}.

    Dotted keys match the `--set optim.lr=...` override syntax, so a param copied from the UI is a
    valid override. Lists stay whole (one param) because their order is their meaning.
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def param_batches(params: Mapping[str, str]) -> list[list[Param]]:
    """Split params into log_batch-sized chunks, truncating values MLflow would reject.

    The full value of a truncated param survives in the `config.yaml` artifact.
    """
    entries = [Param(key, truncate(value)) for key, value in sorted(params.items())]
    return [entries[i : i + MAX_PARAMS_PER_BATCH] for i in range(0, len(entries), MAX_PARAMS_PER_BATCH)]


def truncate(value: str) -> str:
    if len(value) <= MAX_PARAM_VALUE_CHARS:
        return value
    return value[: MAX_PARAM_VALUE_CHARS - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK
