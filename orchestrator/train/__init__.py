"""Pretraining on Ray Train + DeepSpeed: what other packages and the jobs may use.

Who runs what (module: process):

* ``launch``: the job's driver (Ray start, the ``TorchTrainer``, the callback that stops a run on an error a
  restart cannot heal);
* ``job``: the job's driver (before Ray: the run's name, reservation, resume point and MLflow run; the fit under
  Ctrl-C; what the job prints at its end); ``run_control``: the stop request (driver: the actor; workers: rank 0
  asks it);
* ``controller_datasets``: Ray Train's controller (the train stream, rebuilt at every worker-group start);
* ``worker_loop``, ``worker_batches``, ``worker_tracking``, ``worker_checkpoints``, ``engine``, ``parameters``,
  ``step``, ``checkpoint``, ``checkpoint_upload``, ``schedule``: each Train worker (the DeepSpeed engine, the
  contrastive step, checkpoints and their background upload, learning-rate schedule);
* ``initial_weights``: each Train worker (``model.init_from`` loaded into the new model), and the driver's check
  of it before Ray starts.
"""

from orchestrator.facade import lazy_facade

__all__, __getattr__, __dir__ = lazy_facade(__name__, {
    "orchestrator.runs": ("EXPORT_FILE", "STATE_FILE"),
    ".checkpoint": ("CheckpointDamaged", "CheckpointNotSaved", "NoIntactCheckpoint", "TrainState", "read_state",
                    "resume_point", "saved_state"),
    ".engine": ("build_engine", "build_model", "deepspeed_config"),
    ".initial_weights": ("check_initial_weights", "load_initial_weights"),
    ".launch": ("DEFAULT_EXTENSIONS_DIR", "build_trainer", "check_inputs", "init_ray", "name_run",
                "stop_on_unhealable", "worker_environment"),
    ".job": ("EXIT_INTERRUPTED", "FitOutcome", "check_tracking", "conclude", "describe_result", "fit",
             "mlflow_ui_command", "prepare_run", "start_and_fit"),
    ".parameters": ("clamp_logit_scale", "current_logit_scale", "export_openai_state_dict", "full_fp32_parameters"),
    ".schedule": ("SCHEDULE_KINDS", "build_lr_scheduler", "lr_multiplier"),
    ".step": ("StepResult", "accumulated_step", "contrastive_loss", "single_chunk_step"),
    ".worker_loop": ("NonFiniteLossError", "Worker", "count_nonfinite", "evaluate", "optimizer_step",
                     "train_loop_per_worker", "write_export"),
})
