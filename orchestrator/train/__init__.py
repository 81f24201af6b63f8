"""Pretraining on Ray Train + DeepSpeed: what other packages and the jobs may use.

Who runs what (module: process):

* ``launch``: the job's driver (Ray start, the ``TorchTrainer``, the result printed at the end);
* ``controller_datasets``: Ray Train's controller (the train stream, rebuilt at every worker-group start);
* ``worker_loop``, ``worker_batches``, ``engine``, ``parameters``, ``step``, ``checkpoint``, ``schedule``:
  each Train worker (the DeepSpeed engine, the contrastive step, checkpoints, learning-rate schedule);
* ``initial_weights``: each Train worker (``model.init_from`` loaded into the new model), and the driver's check
  of it before Ray starts.
"""

from orchestrator.runs import EXPORT_FILE, STATE_FILE
from orchestrator.train.checkpoint import TrainState, read_state, saved_state
from orchestrator.train.engine import build_engine, build_model, deepspeed_config
from orchestrator.train.initial_weights import check_initial_weights, load_initial_weights
from orchestrator.train.launch import (
    DEFAULT_EXTENSIONS_DIR,
    build_trainer,
    check_inputs,
    describe_result,
    init_ray,
    mlflow_ui_command,
    name_run,
    worker_environment,
)
from orchestrator.train.parameters import clamp_logit_scale, current_logit_scale, export_openai_state_dict, full_fp32_parameters
from orchestrator.train.schedule import SCHEDULE_KINDS, build_lr_scheduler, lr_multiplier
from orchestrator.train.step import StepResult, accumulated_step, contrastive_loss, single_chunk_step
from orchestrator.train.worker_loop import NonFiniteLossError, Worker, count_nonfinite, evaluate, optimizer_step, train_loop_per_worker, write_export

__all__ = [
    "DEFAULT_EXTENSIONS_DIR",
    "EXPORT_FILE",
    "SCHEDULE_KINDS",
    "STATE_FILE",
    "NonFiniteLossError",
    "StepResult",
    "TrainState",
    "Worker",
    "accumulated_step",
    "contrastive_loss",
    "build_engine",
    "build_lr_scheduler",
    "build_model",
    "build_trainer",
    "check_initial_weights",
    "check_inputs",
    "clamp_logit_scale",
    "count_nonfinite",
    "current_logit_scale",
    "deepspeed_config",
    "describe_result",
    "evaluate",
    "export_openai_state_dict",
    "full_fp32_parameters",
    "init_ray",
    "load_initial_weights",
    "lr_multiplier",
    "mlflow_ui_command",
    "name_run",
    "optimizer_step",
    "read_state",
    "saved_state",
    "single_chunk_step",
    "train_loop_per_worker",
    "worker_environment",
    "write_export",
]
