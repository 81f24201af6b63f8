"""Reading a run config: YAML + ``--set`` overrides, validated; local paths fixed before the config travels."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config.run import ConfigError, RunConfig

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides (values parsed as YAML) to a copy of a config dict."""
    result = copy.deepcopy(data)
    for override in overrides:
        path, separator, raw = override.partition("=")
        if not separator or not path.strip():
            raise ConfigError(f"--set {override!r}: expected section.field=value (e.g. optim.lr=3e-4)")
        *parents, leaf = path.strip().split(".")
        node = result
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {override!r}: {part!r} is a value, not a section")
            node = child
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return result


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (default ``configs/local.yaml``), apply ``--set`` overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return RunConfig.from_dict(apply_overrides(data, overrides or []))


def output_base_dir(cwd: str | os.PathLike | None = None, environ: dict[str, str] | None = None) -> Path:
    """Where relative *output* paths (``checkpoint.storage_path``, a sqlite tracking store) resolve.

    The current directory, except in a ``ray job submit --working-dir`` job: its current directory is a
    copy that Ray deletes with the job's runtime resources, which would take checkpoints and the MLflow
    store along, so there ``~/rayclip`` is used. ``$RAYCLIP_HOME``, when set, always wins.
    """
    environ = os.environ if environ is None else environ
    if environ.get("RAYCLIP_HOME"):
        return Path(environ["RAYCLIP_HOME"]).expanduser().resolve()
    cwd = Path(cwd if cwd is not None else os.getcwd()).resolve()
    if in_ray_job_copy(cwd):
        return Path(environ.get("HOME", "~")).expanduser() / "rayclip"
    return cwd


def in_ray_job_copy(cwd: str | os.PathLike | None = None) -> bool:
    """True in a ``ray job submit --working-dir`` job: Ray runs it in a temporary copy of the directory
    (``.../runtime_resources/working_dir_files/...``) that holds only the shipped, non-ignored files."""
    parts = Path(cwd if cwd is not None else os.getcwd()).resolve().parts
    return "working_dir_files" in parts and "runtime_resources" in parts


def resolve_local_paths(cfg: RunConfig, base_dir: str | os.PathLike,
                        output_dir: str | os.PathLike | None = None) -> RunConfig:
    """Make relative local paths absolute: inputs against ``base_dir`` (the driver's cwd), outputs
    (checkpoints, a sqlite MLflow store, an artifact folder) against ``output_dir`` (default: ``base_dir``).

    Ray workers run in other directories, so relative paths must be fixed on the driver before the
    config travels.
    """
    base = Path(base_dir).resolve()
    outputs = Path(output_dir).resolve() if output_dir is not None else base
    data = cfg.model_dump()
    storage = data["checkpoint"]["storage_path"]
    if "://" not in storage and not os.path.isabs(storage):
        data["checkpoint"]["storage_path"] = str(outputs / storage)
    uri = data["tracking"]["uri"]
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        data["tracking"]["uri"] = "sqlite:///" + str(outputs / uri.removeprefix("sqlite:///"))
    artifacts = data["tracking"]["artifact_location"]
    if artifacts and "://" not in artifacts and not os.path.isabs(artifacts):
        data["tracking"]["artifact_location"] = str(outputs / artifacts)
    data["data"] = cfg.data.resolved(base).model_dump(exclude_unset=True)
    init_from = data["model"]["init_from"]
    # a path that exists here; anything else may be a run name, looked up under checkpoint.storage_path
    if init_from and "://" not in init_from and not os.path.isabs(init_from) and (base / init_from).exists():
        data["model"]["init_from"] = str(base / init_from)
    for eval_set in data["eval"]["sets"]:
        for field in ("data", "classnames"):
            if eval_set[field] and "://" not in eval_set[field] and not os.path.isabs(eval_set[field]):
                eval_set[field] = str(base / eval_set[field])
    return RunConfig.from_dict(data)

