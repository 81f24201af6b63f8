"""The training function every Ray Train worker runs: DeepSpeed CLIP pretraining with checkpoint/resume.

Per step: forward, features gathered across ranks with gradient, local-rows x global-columns loss,
backward (exact accumulation over chunks when configured), optimizer step, logit-scale clamp. Every
``checkpoint.every_steps``: every rank saves its shard and reports; at each evaluation set's period
(``eval.every_steps`` for the held-out split, ``eval.sets[].every_steps``): that set evaluated by all
workers together (``orchestrator.eval.InLoopEvaluation``); rank 0 alone talks to MLflow. At the end: final evaluation, the consolidated model
exported in OpenAI's layout, a final checkpoint, and the MLflow run closed.

The worker receives only a plain dict (the validated config's ``model_dump()``) and rebuilds the typed
config, so nothing depends on the driver's globals.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from models import count_parameters
from orchestrator.collectives import all_reduce_sum
from orchestrator.config import HELDOUT_SET, RunConfig
from orchestrator.data import data_health_line
from orchestrator.eval import EvalResult, InLoopEvaluation
from orchestrator.failures import CannotHeal, explains_itself
from orchestrator.logs import duration, get_logger, setup_logging
from orchestrator import noise
from orchestrator.runs import EXPORT_FILE, FIRST_STEP_AT
from orchestrator.train import checkpoint as checkpoints
from orchestrator.train.checkpoint_upload import PendingCheckpoint
from orchestrator.train.run_control import DriverLink
from orchestrator.train.worker_checkpoints import (
    finish_checkpoint,
    finish_checkpoint_if_uploaded,
    reported_metrics,
    save,
)
from orchestrator.train.worker_tracking import (
    Pace,
    Resize,
    close_after_error,
    finish_tracking,
    log_resize_cost,
    note_resize,
    start_tracking,
)
from orchestrator.train.engine import build_engine, build_model
from orchestrator.train.parameters import (
    clamp_logit_scale,
    current_logit_scale,
    export_openai_state_dict,
    full_fp32_parameters,
)
from orchestrator.train.step import StepResult, accumulated_step, contrastive_loss, single_chunk_step
from orchestrator.train.worker_batches import TrainBatches, WorkerStream

logger = get_logger("train")


class NonFiniteLossError(CannotHeal):
    """Too many consecutive steps had a NaN/inf loss; the message says what to change."""


@dataclass
class Worker:
    """What one training worker holds for the whole run."""

    cfg: RunConfig
    rank: int
    world_size: int
    engine: Any
    state: checkpoints.TrainState
    tracker: Any = None
    evaluation: InLoopEvaluation | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    resize: Resize | None = None
    """Set when this worker group resumed a checkpoint of another worker count, until its first step."""
    loss: Any = None
    """The run's loss across ranks (``contrastive_loss``: CLIP's or SigLIP's); None takes ``cfg.loss.kind``'s."""
    stream: WorkerStream | None = None
    """This worker's split of the training stream, started before the engine was built."""
    driver: DriverLink | None = None
    """The line to the job's driver: its stop requests (Ctrl-C), the run's end report."""
    stopped: bool = False
    """The run stopped on the driver's request (it ends with a checkpoint, without the final evaluation)."""
    saved_step: int = -1
    """The step of the last checkpoint this worker group completed."""
    pending_checkpoint: PendingCheckpoint | None = None
    """A checkpoint still uploading in the background (``checkpoint.background``)."""
    logged_once: bool = False
    """This worker group logged a step already (the first one's time includes the stream's start-up)."""
    data_health: str | None = None
    """The last data-health line printed (a new one is printed when the counts change)."""

    def __post_init__(self) -> None:
        if self.loss is None:
            self.loss = contrastive_loss(self.cfg.loss.kind)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def dtype(self) -> torch.dtype:
        """Input dtype: the weights stay float32 under DeepSpeed's torch_autocast, which picks bf16 per op."""
        return torch.float32

    @property
    def step_batch(self) -> int:
        """Samples per step over all ranks: the config's global batch, unless a fixed count was resized."""
        return sum(self.cfg.worker_batch_sizes(self.world_size))

    @property
    def unmasked_from(self) -> int:
        """The step from which patch dropout is off (FLIP's unmasked tuning; the end when it never is)."""
        return self.cfg.schedule.total_steps - self.cfg.model.patch_dropout_off_last_steps

    @property
    def stop_step(self) -> int:
        return self.cfg.schedule.stop_after_steps or self.cfg.schedule.total_steps


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` is ``{"run": RunConfig.model_dump()}``."""
    import deepspeed
    import ray.train

    setup_logging()
    cfg = RunConfig.from_dict(config["run"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    noise.install(noise.TRAIN_WORKER)
    worker = None
    try:
        with noise.printed_lines_dropped(noise.TRAIN_WORKER):
            deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
        worker = _start(cfg, rank, world_size, context.get_local_rank())
        _train(worker)
        _finish(worker)
    except BaseException as error:
        if worker is not None:
            close_after_error(worker)
        if explains_itself(error):  # the job prints its one-line cause; Ray's stack trace would bury it
            noise.install(noise.TRAIN_WORKER, when=noise.EXPLAINED_FAILURE)
        raise
    finally:
        if worker is not None:
            worker.driver.close()


def _start(cfg: RunConfig, rank: int, world_size: int, local_rank: int) -> Worker:
    """The worker's model, engine and state (resumed from the newest intact checkpoint), and its MLflow run."""
    stream = WorkerStream(cfg)  # its start overlaps the engine's
    checkpoint = checkpoints.resume_point(cfg, settle=rank == 0)
    saved_world_size = checkpoints.saved_state(checkpoint).world_size if checkpoint is not None else world_size
    resized = saved_world_size != world_size
    model = build_model(cfg)
    parameters = count_parameters(model)  # counted before ZeRO-3 partitions the tensors inside the engine
    engine = build_engine(cfg, model, world_size, load_universal=resized)
    if rank == 0:
        elastic = f" of {cfg.scaling.min_workers}-{cfg.scaling.max_workers}" if cfg.scaling.elastic else ""
        logger.info("%d workers%s: DeepSpeed ZeRO-%d engine built (%s, global batch %d = %s)", world_size, elastic,
                    cfg.deepspeed.zero_stage, cfg.precision, cfg.global_batch_size, cfg.describe_batch_plan(world_size))
    state = _restore_or_start(cfg, engine, checkpoint, rank, local_rank, world_size)
    worker = Worker(cfg, rank, world_size, engine, state, evaluation=InLoopEvaluation(cfg), stream=stream,
                    driver=DriverLink(cfg.name, rank, engine.device), saved_step=state.step if checkpoint else -1)
    worker.tracker = start_tracking(worker, parameters)
    if resized:
        worker.resize = note_resize(worker, saved_world_size)
    return worker


def _set_patch_dropout(worker: Worker) -> None:
    """Patch dropout as the next step calls for: the configured share before ``unmasked_from``, then none.
    Called before every step and at the start (a resumed model is built without it); says when it changes."""
    share = worker.cfg.model.patch_dropout
    wanted = share if worker.state.step < worker.unmasked_from else 0.0
    if not share or worker.engine.module.visual.patch_dropout == wanted:
        return
    worker.engine.module.set_patch_dropout(wanted)
    if worker.is_chief and wanted:
        logger.info("patch dropout %g: each training image keeps %d%% of its patches until step %d", share,
                    round(100 * (1 - share)), worker.unmasked_from)
    elif worker.is_chief:
        logger.info("patch dropout off from step %d: the last %d step(s) see every patch (unmasked tuning)",
                    worker.state.step + 1, worker.cfg.schedule.total_steps - worker.state.step)


def _restore_or_start(cfg: RunConfig, engine, checkpoint, rank: int, local_rank: int,
                      world_size: int) -> checkpoints.TrainState:
    torch.manual_seed(cfg.seed + rank)  # each rank its own RNG stream, reproducibly (a checkpoint's replaces it)
    if checkpoint is None:
        return checkpoints.TrainState(world_size=world_size)
    state = checkpoints.restore(engine, checkpoint, rank, world_size, local_rank)
    if rank == 0:
        logger.info("resumed from %s at step %d", checkpoint.location.url, state.step)
    return state


def _train(worker: Worker) -> None:
    cfg, state = worker.cfg, worker.state
    batches = TrainBatches(cfg, worker.engine.device, worker.dtype, state.data_position, worker.stream)
    global_batch = worker.step_batch
    window_start, window_samples, window_paused = time.perf_counter(), 0, 0.0
    pace = Pace(first_step=state.step)
    for images, tokens in batches:
        if state.step >= worker.stop_step:
            break
        if worker.driver.stop_requested():
            worker.stopped = True
            break
        _set_patch_dropout(worker)
        result = optimizer_step(worker, images, tokens)
        state.samples_seen += global_batch
        window_samples += global_batch
        if not result.finite:
            count_nonfinite(worker, result)
            continue
        state.step += 1
        state.nonfinite_in_row = 0
        if worker.resize is not None:
            log_resize_cost(worker)
        if state.step % cfg.tracking.log_every_steps == 0 or not worker.logged_once:
            elapsed = time.perf_counter() - window_start
            step_s = (elapsed - window_paused) * global_batch / max(window_samples, 1)  # training alone
            _log_step(worker, result, window_samples / max(elapsed, 1e-9), batches, pace.eta_s(state.step,
                      worker.stop_step, step_s))
            window_start, window_samples, window_paused = time.perf_counter(), 0, 0.0
        if state.step >= worker.stop_step:
            break
        paused_from = time.perf_counter()
        finish_checkpoint_if_uploaded(worker)
        if worker.evaluation.due(state.step):
            evaluate(worker)
            if state.step % cfg.checkpoint.every_steps:  # else the checkpoint's report carries the results
                finish_checkpoint(worker)  # reports reach Ray Tune in step order
                checkpoints.report_metrics(reported_metrics(worker))  # Ray Tune's schedulers act on them
        if state.step % cfg.checkpoint.every_steps == 0:
            state.data_position = batches.position()
            save(worker, background=cfg.checkpoint.background)
        window_paused += pace.paused(time.perf_counter() - paused_from)
    if worker.is_chief:
        _note_data_health(worker, batches.error_counters())
    if state.step < worker.stop_step and worker.is_chief and not worker.stopped:
        logger.warning("the data stream ended at step %d of %d", state.step, worker.stop_step)
    state.data_position = batches.position()


def optimizer_step(worker: Worker, images: torch.Tensor, tokens: torch.Tensor) -> StepResult:
    """One optimizer step's forward/backward (exact accumulation over chunks) and DeepSpeed step."""
    engine = worker.engine

    def backward(loss: torch.Tensor) -> None:
        engine.backward(loss, scale_wrt_gas=False)  # chunk gradients are exact parts of the sum
        engine.step()  # DeepSpeed applies the optimizer on the last chunk only

    cfg, world_size = worker.cfg, worker.world_size
    share = world_size * cfg.worker_batch_size(world_size, worker.rank) / worker.step_batch  # 1 when ranks are even
    common = dict(loss=worker.loss, backward=backward, all_reduce=all_reduce_sum, loss_weight=share)
    chunks = cfg.accumulation_chunks(world_size)
    if chunks == 1:
        result = single_chunk_step(engine, images, tokens, **common)
    else:
        result = accumulated_step(engine, images, tokens, chunks=chunks, **common)
    if result.finite:
        clamp_logit_scale(engine, worker.cfg.loss.max_logit_scale)
    return result


def count_nonfinite(worker: Worker, result: StepResult) -> None:
    state, limit = worker.state, worker.cfg.loss.max_nonfinite_in_row
    state.nonfinite_steps += 1
    state.nonfinite_in_row += 1
    if worker.is_chief:
        logger.warning("step %d: loss %s is not finite; step skipped", state.step + 1, float(result.loss))
    if state.nonfinite_in_row >= limit:
        raise NonFiniteLossError(
            f"{state.nonfinite_in_row} consecutive steps had a NaN/inf loss (loss.max_nonfinite_in_row={limit}) "
            f"at step {state.step}: lower optim.lr, raise schedule.warmup_steps, set optim.grad_clip_norm, "
            "or use deepspeed.precision=fp32"
        )


def _mean_over_ranks(value: torch.Tensor, world_size: int) -> float:
    return float(all_reduce_sum(value.detach().float().reshape(1).cpu().clone())) / world_size


def _log_step(worker: Worker, result: StepResult, samples_per_s: float, batches: TrainBatches,
              remaining_s: float) -> None:
    """Collective (loss averaged over ranks); rank 0 prints and sends to MLflow."""
    loss = _mean_over_ranks(result.loss, worker.world_size)
    metrics = {
        "train/loss": loss,
        "train/logit_scale": current_logit_scale(worker.engine, worker.cfg.deepspeed.zero_stage, worker.cfg.loss.max_logit_scale),
        "train/lr": float(worker.engine.get_lr()[0]),
        "train/samples_per_s": samples_per_s,
        "train/samples_seen": float(worker.state.samples_seen),
        "train/nonfinite_steps": float(worker.state.nonfinite_steps),
        "scaling/workers": float(worker.world_size),
        "scaling/accumulation_chunks": float(worker.cfg.accumulation_chunks(worker.world_size)),
        **batches.error_counters(),
    }
    if worker.cfg.model.patch_dropout:
        metrics["train/patch_dropout"] = float(worker.engine.module.visual.patch_dropout)  # what this step used
    if worker.cfg.loss.kind == "siglip":  # gathered under ZeRO-3: every rank takes part
        bias = full_fp32_parameters(worker.engine, worker.cfg.deepspeed.zero_stage, ["logit_bias"])["logit_bias"]
        metrics["train/logit_bias"] = float(bias.reshape(()))
    worker.last_metrics.update(metrics)
    if not worker.logged_once:  # this worker group ended its first step now: Tune's driver prints each trial's start
        worker.last_metrics[FIRST_STEP_AT] = time.time()
    if worker.is_chief:
        progress = f"step {worker.state.step}/{worker.cfg.schedule.total_steps} loss {loss:.4f} lr {metrics['train/lr']:.2e}"
        if not worker.logged_once:  # its time includes the stream's start-up: no rate to extrapolate yet
            logger.info("%s (rate and ETA from the next logged step)", progress)
        else:
            logger.info("%s %.1f samples/s ETA %s", progress, samples_per_s, duration(remaining_s))
        worker.tracker.log_metrics(metrics, worker.state.step)
        _note_data_health(worker, metrics)
    worker.logged_once = True


def _note_data_health(worker: Worker, counters: dict[str, float]) -> None:
    """Rank 0: one line whenever the data skipped or lost since the last one changed (MLflow has the counts too)."""
    health = data_health_line(counters)
    if health is not None and health != worker.data_health:
        worker.data_health = health
        logger.warning("step %d: %s", worker.state.step, health)


def evaluate(worker: Worker, *, final: bool = False) -> list[EvalResult]:
    """Evaluate the sets due at this step, or every set when ``final`` (collective); rank 0 logs them.

    The held-out split's zero-shot top-1/top-5 also go out as ``zero_shot_top1`` / ``zero_shot_top5``.
    """
    due = worker.evaluation.due(worker.state.step, final=final)
    if not due:
        return []
    cfg = worker.cfg
    scale = current_logit_scale(worker.engine, cfg.deepspeed.zero_stage, cfg.loss.max_logit_scale)  # collective
    results = worker.evaluation.run(worker.engine.module, due, rank=worker.rank, world_size=worker.world_size,
                                    device=worker.engine.device, bf16=cfg.precision == "bf16", logit_scale=scale)
    for result in results:
        extra = {}
        if result.set_name == HELDOUT_SET and result.task == "zeroshot":
            extra = {"zero_shot_top1": result.metrics["zeroshot_top1"], "zero_shot_top5": result.metrics["zeroshot_top5"]}
        worker.last_metrics.update({f"eval/{result.set_name}/{name}": value for name, value in result.metrics.items()})
        worker.last_metrics.update(extra)
        if worker.is_chief:
            bad = f", {sum(result.bad_samples.values())} bad samples skipped" if result.bad_samples else ""
            logger.info("step %d: %s (%d images%s, %.1f s)", worker.state.step, result.headline, result.images, bad,
                        result.seconds)
            worker.tracker.log_evaluation(result, worker.state.step, extra)
    return results


def _finish(worker: Worker) -> None:
    """Final evaluation, export, final checkpoint (with the export), the MLflow run closed, and the end report
    for the driver (what reached MLflow). A run that ended short (the data stream ran out) is neither exported nor
    registered; one stopped on request only gets its checkpoint."""
    state = worker.state
    finish_checkpoint(worker)
    if worker.stopped:
        if worker.is_chief:
            logger.info("stopping at step %d as the job asked", state.step)
        if state.step > max(worker.saved_step, 0):  # nothing trained since the last save (or at all): none to add
            save(worker)
        if worker.is_chief:
            worker.driver.report_end({"stopped": True, "step": state.step, "checkpoint_step": worker.saved_step,
                                      **finish_tracking(worker, None, "KILLED")})
        return
    evaluate(worker, final=True)
    finished = state.step >= worker.cfg.schedule.total_steps
    with tempfile.TemporaryDirectory() as scratch:
        exporting = finished or bool(worker.cfg.schedule.stop_after_steps)  # the same on every rank: collective
        export_path = write_export(worker, scratch) if exporting else None  # rank 0's path, None on the others
        if exporting or state.step > worker.saved_step:  # a stream that ran out right after a save: it stands
            save(worker, {EXPORT_FILE: export_path} if export_path else None)
        outcome = finish_tracking(worker, export_path if finished else None, "FINISHED" if finished else "KILLED")
    if worker.is_chief:
        worker.driver.report_end({"step": state.step, **outcome})


def write_export(worker: Worker, directory: str) -> str | None:
    """The consolidated fp32 model in OpenAI's layout, written by rank 0 (collective); its path on rank 0."""
    state = export_openai_state_dict(worker.engine, worker.cfg.deepspeed.zero_stage)
    if not worker.is_chief:
        return None
    path = os.path.join(directory, EXPORT_FILE)
    torch.save(state, path)
    return path
