"""The ``train`` dataset as Ray Train's controller builds it: from the run's latest checkpoint position.

Ray Train calls a dataset *factory* each time it starts the worker group (first start, restart after a
failure, ``--resume``); this runs in the Train controller. The factory reads the data position of the
checkpoint the workers will resume from (the newest intact one) from storage, plans the stream from there, and names the new stream's monitor
in a small registry actor, where the (re)started workers look it up (``orchestrator.train.worker_batches``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from orchestrator.config import RunConfig
from orchestrator.data import StreamProgress, VisitTable, build_train_dataset, control_actor_options, resolve_sources

if TYPE_CHECKING:
    from orchestrator.train.checkpoint import TrainState

REGISTRY_NAMESPACE = "rayclip-data"


class StreamRegistry:
    """Ray actor naming the current stream's monitor, so restarted workers find the stream they read."""

    def __init__(self) -> None:
        self.monitor_name: str | None = None
        self.stream = None

    def set(self, monitor_name: str, stream: Any) -> None:
        self.monitor_name, self.stream = monitor_name, stream  # holding the stream keeps its monitor alive

    def get(self) -> str | None:
        return self.monitor_name


def registry_name(cfg: RunConfig) -> str:
    return f"rayclip-stream-registry-{cfg.name}"


def current_monitor(cfg: RunConfig) -> str:
    """The monitor name of the run's current stream (called by every training worker at start)."""
    import ray

    registry = ray.get_actor(registry_name(cfg), namespace=REGISTRY_NAMESPACE)
    return ray.get(registry.get.remote())


def epochs_to_plan(cfg: RunConfig, samples_per_epoch: int) -> int:
    """Epochs the stream must cover for the whole schedule, plus one for skipped steps and dropped tails."""
    needed = cfg.schedule.total_steps * cfg.global_batch_size / max(1, samples_per_epoch)
    return math.ceil(needed) + 1


def latest_checkpoint_state(cfg: RunConfig) -> TrainState | None:
    """The train state of the checkpoint the workers resume from (``resume_point``; None before the first)."""
    from orchestrator.train.checkpoint import resume_point, saved_state  # torch: not in the registry actor

    checkpoint = resume_point(cfg)
    return None if checkpoint is None else saved_state(checkpoint)


class TrainDatasetFactory:
    """What ``TorchTrainer(datasets={"train": ...})`` calls on every worker-group start: the train stream
    from the latest checkpoint's position (a picklable object; the config travels as a plain dict)."""

    # Handles held by the process that builds the stream (Ray Train's controller): a named actor lives only
    # while someone references it, and the controller lives exactly as long as the run. A class attribute,
    # so every call in the controller shares it (the class is pickled by reference, the instance by value).
    live_registries: dict[str, Any] = {}
    resolved_sources: dict[str, list] = {}  # run name -> its resolved shard sets (listed and counted once)

    def __init__(self, cfg: RunConfig):
        self.config = cfg.model_dump(mode="json")

    def __call__(self):
        import ray

        run = RunConfig.from_dict(self.config)
        state = latest_checkpoint_state(run)
        progress = state.data_position.stream if state is not None else StreamProgress()
        resolved = TrainDatasetFactory.resolved_sources
        if run.name not in resolved:
            resolved[run.name] = resolve_sources(run.data)
        sources = resolved[run.name]
        per_epoch = VisitTable.of_sources(sources).samples_per_epoch
        stream = build_train_dataset(run.data, epochs=epochs_to_plan(run, per_epoch), position=progress,
                                     sources=sources, consumers=run.scaling.max_workers)
        name, live = registry_name(run), TrainDatasetFactory.live_registries
        if name not in live:  # the creating handle owns the actor: keep that one, not a borrowed one
            live[name] = ray.remote(StreamRegistry).options(**control_actor_options(name, REGISTRY_NAMESPACE)).remote()
        ray.get(live[name].set.remote(stream.monitor_name, stream))
        return stream.dataset


def build_datasets(cfg: RunConfig) -> dict[str, Any]:
    """``TorchTrainer(datasets=...)``: the train stream, rebuilt from the right position on every start."""
    return {"train": TrainDatasetFactory(cfg)}
