"""Package facades whose names load on first use (PEP 562).

A Ray actor is started in a fresh process that imports the module of its class, and with it every package
``__init__`` above that module. With eager facades a small bookkeeping actor imported torch, DeepSpeed and MLflow
(5-6 s per process on a 2-core machine, several such processes in a row at a run's start). A lazy facade keeps
the public names in one place and imports a module only when one of its names is used.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable


def lazy_facade(package: str, exports: dict[str, tuple[str, ...]]) -> tuple[list[str], Callable, Callable]:
    """``(__all__, __getattr__, __dir__)`` for ``package``, whose ``exports`` map a module (absolute, or relative
    to the package when it starts with a dot) to the names it provides ("name", or "name as alias" as in an
    import)."""
    home: dict[str, tuple[str, str]] = {}
    for module, names in exports.items():
        module = importlib.util.resolve_name(module, package) if module.startswith(".") else module
        for entry in names:
            name, _, alias = entry.partition(" as ")
            home[alias or name] = (module, name)
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attribute = home[name]
        value = getattr(importlib.import_module(module), attribute)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(home))

    return sorted(home), __getattr__, __dir__
