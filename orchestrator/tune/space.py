"""The tune section's search space as Ray Tune's, and back (runs in the search's driver and in trials).

Ray Tune takes nested dicts of sample domains and hands each trial the same nesting with values; rayclip
names fields by their dotted path, so the space is nested on the way in and flattened on the way out.
"""

from __future__ import annotations

from typing import Any

from orchestrator.config import Distribution, TuneSection


def domain(distribution: Distribution):
    """Ray Tune's sampler for one distribution (``randint`` includes ``high``; Tune's excludes it)."""
    from ray import tune

    if distribution.kind == "choice":
        return tune.choice(distribution.values)
    if distribution.kind == "grid":
        return tune.grid_search(distribution.values)
    if distribution.kind == "uniform":
        return tune.uniform(distribution.low, distribution.high)
    if distribution.kind == "loguniform":
        return tune.loguniform(distribution.low, distribution.high)
    return tune.randint(int(distribution.low), int(distribution.high) + 1)


def param_space(section: TuneSection) -> dict[str, Any]:
    """``{"optim.lr": loguniform}`` -> ``{"optim": {"lr": tune.loguniform(...)}}``."""
    space: dict[str, Any] = {}
    for path, distribution in section.search_space.items():
        *parents, leaf = path.split(".")
        node = space
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = domain(distribution)
    return space


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A trial's nested config back to ``{"optim.lr": 0.001, ...}``."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def short_value(value: Any) -> str:
    """A sampled value as people read it in a line or a table: floats to 3 significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)
