"""The training function every Ray Train worker runs: DeepSpeed CLIP pretraining with checkpoint/resume.

Per step: forward, features gathered across ranks with gradient, local-rows x global-columns loss,
backward (exact accumulation over chunks when configured), optimizer step, logit-scale clamp. Every
``checkpoint.every_steps``: every rank saves its shard and reports; every ``eval.every_steps``: sharded
zero-shot evaluation; rank 0 alone talks to MLflow. At the end: final evaluation, the consolidated model
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

from orchestrator import checkpoint as checkpoints
from orchestrator.collectives import all_reduce_sum, gather_with_grad
from orchestrator.config import RunConfig
from orchestrator.contrastive_step import StepResult, accumulated_step, single_chunk_step
from orchestrator.engine import build_engine, build_model, clamp_logit_scale
from orchestrator.evaluation import LabelledImages, ZeroShotResult, evaluate_zero_shot
from orchestrator.training_data import TrainBatches, load_eval_set, tokenizer_for


class NonFiniteLossError(RuntimeError):
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
    eval_set: LabelledImages | None = None
    eval_templates: list[str] = field(default_factory=list)
    last_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def dtype(self) -> torch.dtype:
        """Input dtype: the weights stay float32 under DeepSpeed's torch_autocast, which picks bf16 per op."""
        return torch.float32

    @property
    def stop_step(self) -> int:
        return self.cfg.schedule.stop_after_steps or self.cfg.schedule.total_steps


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` is ``{"run": RunConfig.model_dump()}``."""
    import deepspeed
    import ray.train

    cfg = RunConfig.from_dict(config["run"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
    checkpoint = ray.train.get_checkpoint()
    resized = checkpoint is not None and checkpoints.saved_state(checkpoint).world_size != world_size
    engine = build_engine(cfg, build_model(cfg), world_size, load_universal=resized)
    state = _restore_or_start(cfg, engine, checkpoint, rank, context.get_local_rank(), world_size)
    worker = Worker(cfg, rank, world_size, engine, state)
    worker.eval_set, worker.eval_templates = load_eval_set(cfg, engine.module.image_size) or (None, [])
    worker.tracker = _start_tracking(worker)
    try:
        _train(worker)
        _finish(worker)
    except BaseException:
        if worker.tracker is not None:
            worker.tracker.finish(None, status="FAILED")  # a restarted attempt reopens the same run
        raise


def _restore_or_start(cfg: RunConfig, engine, checkpoint, rank: int, local_rank: int,
                      world_size: int) -> checkpoints.TrainState:
    torch.manual_seed(cfg.seed + rank)  # each rank its own RNG stream, reproducibly (a checkpoint's replaces it)
    if checkpoint is None:
        return checkpoints.TrainState(world_size=world_size)
    state = checkpoints.restore(engine, checkpoint, rank, world_size, local_rank)
    if rank == 0:
        print(f"[rayclip] resumed from {checkpoint.path} at step {state.step}", flush=True)
    return state


def _start_tracking(worker: Worker):
    """Rank 0 opens (or, after a restart, reopens) the MLflow run; its id goes into every checkpoint."""
    if not worker.is_chief:
        return None
    from orchestrator.tracking import RunTracker

    cfg = worker.cfg
    tracker = RunTracker.from_config(cfg.tracking)
    worker.state.mlflow_run_id = tracker.start(
        cfg.model_dump(mode="json"),
        cfg.to_yaml(),
        run_name=cfg.tracking.run_name or cfg.name,
        resume_run_id=worker.state.mlflow_run_id,
        world_size=worker.world_size,
    )
    return tracker


def _train(worker: Worker) -> None:
    cfg, state = worker.cfg, worker.state
    batches = TrainBatches(cfg, worker.engine.device, worker.dtype, state.data_position)
    global_batch = cfg.global_batch_size
    window_start, window_samples = time.perf_counter(), 0
    for images, tokens in batches:
        if state.step >= worker.stop_step:
            break
        result = _optimizer_step(worker, images, tokens)
        state.samples_seen += global_batch
        window_samples += global_batch
        if not result.finite:
            _count_nonfinite(worker, result)
            continue
        state.step += 1
        state.nonfinite_in_row = 0
        if state.step % cfg.tracking.log_every_steps == 0 or state.step == 1:
            elapsed = time.perf_counter() - window_start
            _log_step(worker, result, window_samples / max(elapsed, 1e-9), batches)
            window_start, window_samples = time.perf_counter(), 0
        if state.step >= worker.stop_step:
            break
        if cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0:
            _evaluate(worker)
        if state.step % cfg.checkpoint.every_steps == 0:
            state.data_position = batches.position()
            checkpoints.save_and_report(worker.engine, state, worker.rank, _report_metrics(worker))
    if state.step < worker.stop_step and worker.is_chief:
        print(f"[rayclip] the data stream ended at step {state.step} of {worker.stop_step}", flush=True)
    state.data_position = batches.position()


def _optimizer_step(worker: Worker, images: torch.Tensor, tokens: torch.Tensor) -> StepResult:
    """One optimizer step's forward/backward (exact accumulation over chunks) and DeepSpeed step."""
    engine = worker.engine

    def backward(loss: torch.Tensor) -> None:
        engine.backward(loss, scale_wrt_gas=False)  # chunk gradients are exact parts of the sum
        engine.step()  # DeepSpeed applies the optimizer on the last chunk only

    common = dict(gather=gather_with_grad, backward=backward, all_reduce=all_reduce_sum)
    chunks = worker.cfg.deepspeed.grad_accum_steps
    if chunks == 1:
        result = single_chunk_step(engine, images, tokens, **common)
    else:
        result = accumulated_step(engine, images, tokens, chunks=chunks, **common)
    if result.finite:
        clamp_logit_scale(engine, worker.cfg.loss.max_logit_scale)
    return result


def _count_nonfinite(worker: Worker, result: StepResult) -> None:
    state, limit = worker.state, worker.cfg.loss.max_nonfinite_in_row
    state.nonfinite_steps += 1
    state.nonfinite_in_row += 1
    if worker.is_chief:
        print(f"[rayclip] step {state.step + 1}: loss {float(result.loss)} is not finite; step skipped", flush=True)
    if state.nonfinite_in_row >= limit:
        raise NonFiniteLossError(
            f"{state.nonfinite_in_row} consecutive steps had a NaN/inf loss (loss.max_nonfinite_in_row={limit}) "
            f"at step {state.step}: lower optim.lr, raise schedule.warmup_steps, set optim.grad_clip_norm, "
            "or use deepspeed.precision=fp32"
        )


def _mean_over_ranks(value: torch.Tensor, world_size: int) -> float:
    return float(all_reduce_sum(value.detach().float().reshape(1).cpu().clone())) / world_size


def _log_step(worker: Worker, result: StepResult, samples_per_s: float, batches: TrainBatches) -> None:
    """Collective (loss averaged over ranks); rank 0 prints and sends to MLflow."""
    loss = _mean_over_ranks(result.loss, worker.world_size)
    metrics = {
        "train/loss": loss,
        "train/logit_scale": _current_logit_scale(worker),
        "train/lr": float(worker.engine.get_lr()[0]),
        "train/samples_per_s": samples_per_s,
        "train/samples_seen": float(worker.state.samples_seen),
        "train/nonfinite_steps": float(worker.state.nonfinite_steps),
        **batches.error_counters(),
    }
    worker.last_metrics.update(metrics)
    if worker.is_chief:
        print(f"[rayclip] step {worker.state.step}/{worker.cfg.schedule.total_steps} loss {loss:.4f} "
              f"lr {metrics['train/lr']:.2e} {samples_per_s:.1f} samples/s", flush=True)
        worker.tracker.log_metrics(metrics, worker.state.step)


def _current_logit_scale(worker: Worker) -> float:
    """exp(logit scale) as the next forward uses it (collective: ZeRO keeps the value partitioned)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    parameter = worker.engine.module.logit_scale
    value = safe_get_full_fp32_param(parameter) if parameter.requires_grad else None
    if value is None:
        zero3 = worker.cfg.deepspeed.zero_stage == 3
        with deepspeed.zero.GatheredParameters([parameter], enabled=zero3):
            value = parameter.detach().float().clone()
    return float(value.exp().clamp(max=worker.cfg.loss.max_logit_scale).reshape(()))


def _evaluate(worker: Worker) -> ZeroShotResult | None:
    """Sharded zero-shot evaluation (collective); rank 0 logs it."""
    if worker.eval_set is None:
        return None
    cfg = worker.cfg
    # The bare module runs outside the engine's forward, so it needs the engine's autocast itself.
    with torch.autocast(worker.engine.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        result = evaluate_zero_shot(
            worker.engine.module,
            worker.eval_set,
            tokenizer_for(cfg),
            worker.eval_templates,
            rank=worker.rank,
            world_size=worker.world_size,
            batch_size=cfg.eval.batch_size,
            dtype=worker.dtype,
        )
    worker.last_metrics.update({"zero_shot_top1": result.top1, "zero_shot_top5": result.top5})
    if worker.is_chief:
        print(f"[rayclip] step {worker.state.step}: zero-shot top-1 {result.top1:.3f} top-5 {result.top5:.3f} "
              f"on {result.images} images", flush=True)
        worker.tracker.log_zero_shot(
            worker.state.step, result.top1, result.top5, result.confusion.numpy(), result.class_names
        )
    return result


def _report_metrics(worker: Worker) -> dict[str, Any]:
    state = worker.state
    return {"step": state.step, "samples_seen": state.samples_seen, "mlflow_run_id": state.mlflow_run_id, **worker.last_metrics}


def _finish(worker: Worker) -> None:
    """Final evaluation, export, final checkpoint (with the export), and the MLflow run closed."""
    _evaluate(worker)
    with tempfile.TemporaryDirectory() as scratch:
        export_path = _export_openai_state_dict(worker, scratch)
        extra = {checkpoints.EXPORT_FILE: export_path} if export_path else None
        checkpoints.save_and_report(worker.engine, worker.state, worker.rank, _report_metrics(worker), extra)
        if worker.tracker is not None:
            finished = worker.state.step >= worker.cfg.schedule.total_steps
            worker.tracker.finish(export_path, status="FINISHED" if finished else "KILLED")


def _export_openai_state_dict(worker: Worker, directory: str) -> str | None:
    """The consolidated fp32 model in OpenAI's state-dict layout, written by rank 0 (collective).

    Weights come from the optimizer's fp32 master copy where DeepSpeed keeps one (ZeRO, bf16), so a
    bf16 run exports full-precision weights; ZeRO-3 partitions are gathered first.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = worker.engine.module
    gathered = list(module.parameters()) if worker.cfg.deepspeed.zero_stage == 3 else []
    with deepspeed.zero.GatheredParameters(gathered, modifier_rank=None, enabled=bool(gathered)):
        state = {k: v.float().cpu() for k, v in module.openai_state_dict().items()}
        for name, parameter in module.named_parameters():
            master = safe_get_full_fp32_param(parameter) if parameter.requires_grad else None
            if master is not None:
                state[name] = master.detach().float().cpu().reshape(state[name].shape)
    if not worker.is_chief:
        return None
    path = os.path.join(directory, checkpoints.EXPORT_FILE)
    torch.save(state, path)
    return path
