"""The run config: typed sections validated before Ray starts (runs in the driver; workers rebuild it).

What other packages may use; the modules behind it are ``sections`` (model ... eval), ``data`` (the data
section), ``run`` (``RunConfig`` and its cross-field checks) and ``loading`` (YAML, ``--set``, paths).
"""

from orchestrator.config.data import DataConfig, DataSource
from orchestrator.config.loading import (
    DEFAULT_CONFIG_PATH,
    apply_overrides,
    in_ray_job_copy,
    load_config,
    output_base_dir,
    resolve_local_paths,
)
from orchestrator.config.tune import Distribution, TuneSection, set_dotted
from orchestrator.config.run import HELDOUT_SET, ConfigError, RunConfig, format_validation_error
from orchestrator.config.sections import (
    CheckpointConfig,
    EVAL_LAYOUTS,
    EVAL_TASKS,
    DeepSpeedConfig,
    EvalConfig,
    EvalSetConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ScalingSection,
    ScheduleConfig,
    TrackingConfig,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "Distribution",
    "TuneSection",
    "set_dotted",
    "EVAL_LAYOUTS",
    "EVAL_TASKS",
    "HELDOUT_SET",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DataSource",
    "DeepSpeedConfig",
    "EvalConfig",
    "EvalSetConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScalingSection",
    "ScheduleConfig",
    "TrackingConfig",
    "apply_overrides",
    "format_validation_error",
    "in_ray_job_copy",
    "load_config",
    "output_base_dir",
    "resolve_local_paths",
]
