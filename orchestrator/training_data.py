"""The training loop's side of the data stream: which stream a (re)started run reads, and fixed-size batches.

``orchestrator.data`` streams shards and tracks, per (epoch, shard), what has been fully consumed. Two
things the training loop adds here:

* **Restart at the right place.** Ray Train calls a dataset *factory* each time it starts the worker
  group (first start, restart after a failure, ``--resume``). The factory reads the data position of the
  run's latest checkpoint from storage and plans the stream from there, then tells the workers the new
  stream's monitor through a small named registry actor.
* **No repeated sample, equal batches.** Shards are the stream's resume unit, so shards that were
  partly consumed at the checkpoint are streamed again; the checkpoint also stores the sample ids
  already consumed from those shards, and they are filtered out here. Batches are re-cut to the exact
  per-worker size, which the cross-rank feature gather needs; when one rank's split runs dry, all ranks
  stop together.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch

from models.transforms import channels_last_batch_to_model
from orchestrator.config import RunConfig
from orchestrator.evaluation import LabelledImages

REGISTRY_NAMESPACE = "rayclip-data"
# Handles held by the process that builds the stream (Ray Train's controller): a named actor lives only
# while someone references it, and the controller lives exactly as long as the run.
_LIVE_REGISTRIES: dict[str, Any] = {}


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


def epochs_to_plan(cfg: RunConfig, samples_per_epoch: int) -> int:
    """Epochs the stream must cover for the whole schedule, plus one for skipped steps and dropped tails."""
    needed = cfg.schedule.total_steps * cfg.global_batch_size / max(1, samples_per_epoch)
    return math.ceil(needed) + 1


def latest_checkpoint_state(cfg: RunConfig) -> dict[str, Any] | None:
    """``train_state.json`` of the run's latest reported checkpoint in storage (None before the first)."""
    import pyarrow.fs as pafs

    from orchestrator.checkpoint import STATE_FILE
    from orchestrator.trainer import RUN_SNAPSHOT, storage_target

    target = storage_target(cfg)
    filesystem = target.filesystem or pafs.LocalFileSystem()
    run_dir = f"{target.path.rstrip('/')}/{cfg.name}"
    try:
        with filesystem.open_input_stream(f"{run_dir}/{RUN_SNAPSHOT}") as handle:
            latest = json.loads(handle.read()).get("latest_checkpoint_result")
        if not latest:
            return None
        with filesystem.open_input_stream(f"{run_dir}/{latest['checkpoint_dir_name']}/{STATE_FILE}") as handle:
            return json.loads(handle.read())
    except FileNotFoundError:
        return None


def dataset_factory(cfg: RunConfig):
    """A zero-argument callable building the ``train`` dataset from the latest checkpoint's position."""
    config = cfg.model_dump(mode="json")

    def build_train_dataset_from_latest_position():
        import ray

        from orchestrator import training_data  # the imported module, not this closure's pickled globals
        from orchestrator.data import build_train_dataset, control_actor_options, open_shard_set

        run = RunConfig.from_dict(config)
        state = latest_checkpoint_state(run) or {}
        position = (state.get("data_position") or {}).get("stream")
        _, manifest = open_shard_set(run.data.shards, run.data.s3_endpoint_url)
        stream = build_train_dataset(run.data, epochs=epochs_to_plan(run, manifest.total_samples), position=position)
        live = training_data._LIVE_REGISTRIES
        name = registry_name(run)
        if name not in live:  # the creating handle owns the actor: keep that one, not a borrowed one
            live[name] = ray.remote(StreamRegistry).options(**control_actor_options(name, REGISTRY_NAMESPACE)).remote()
        ray.get(live[name].set.remote(stream.monitor_name, stream))
        return stream.dataset

    return build_train_dataset_from_latest_position


def build_datasets(cfg: RunConfig) -> dict[str, Any]:
    """``TorchTrainer(datasets=...)``: the train stream, rebuilt from the right position on every start."""
    return {"train": dataset_factory(cfg)}


def _ranges(ids: list[int]) -> list[list[int]]:
    """Sorted ids as inclusive [first, last] runs (consumed ids within a shard are mostly contiguous)."""
    runs: list[list[int]] = []
    for value in sorted(set(ids)):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return runs


def _expand(runs: list[list[int]]) -> set[int]:
    return {value for first, last in runs for value in range(first, last + 1)}


class TrainBatches:
    """Fixed-size ``(images, tokens)`` batches for this worker, resumable without repeating samples.

    ``position()`` is collective (all ranks call it at checkpoints): it merges every rank's consumed ids
    of the partly consumed shards with the stream's shard-level position.
    """

    def __init__(self, cfg: RunConfig, device: torch.device, dtype: torch.dtype, position: dict | None):
        import ray.train

        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.batch_size = cfg.data.batch_size
        self.monitor_name = self._current_monitor(cfg)
        self.rank = ray.train.get_context().get_world_rank()
        self.shard = ray.train.get_dataset_shard("train")
        skip = (position or {}).get("consumed", {})
        self.skip = {key: _expand(runs) for key, runs in skip.items()}  # "epoch:sample_id-shard" -> ordinals
        self.consumed: dict[str, list[int]] = defaultdict(list)
        self.filtered_repeats = 0
        self.shard_names = _shard_names(cfg)
        self.audit = list((position or {}).get("audit", [])) if cfg.checkpoint.audit_sample_ids else None
        self.new_audit: list[str] = []

    @staticmethod
    def _current_monitor(cfg: RunConfig) -> str:
        import ray

        registry = ray.get_actor(registry_name(cfg), namespace=REGISTRY_NAMESPACE)
        return ray.get(registry.get.remote())

    def _rows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, str, int]]:
        from orchestrator.data import SHARD_ID_BITS, iter_train_batches

        for batch in iter_train_batches(self.shard, self.cfg.data, self.monitor_name, rank=self.rank):
            keys = [f"{e}:{s}" for e, s in zip(batch["epoch"].tolist(), batch["shard_index"].tolist())]
            ordinals = (batch["sample_id"] & ((1 << SHARD_ID_BITS) - 1)).tolist()
            for row, (key, ordinal) in enumerate(zip(keys, ordinals)):
                if ordinal in self.skip.get(key, ()):
                    self.filtered_repeats += 1
                    continue
                yield batch["image"][row], batch["text"][row], key, ordinal

    def _local_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, texts = [], []
        for image, text, key, ordinal in self._rows():
            images.append(image)
            texts.append(text)
            self.consumed[key].append(ordinal)
            if self.audit is not None:
                self.new_audit.append(f"{key}:{ordinal}")
            if len(images) == self.batch_size:
                yield torch.stack(images), torch.stack(texts)
                images, texts = [], []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from orchestrator.collectives import all_reduce_sum

        local = self._local_batches()
        while True:
            batch = next(local, None)
            missing = all_reduce_sum(torch.tensor([0.0 if batch is not None else 1.0]))
            if float(missing) > 0:  # some rank's split is exhausted: every rank stops at the same step
                return
            images, tokens = batch
            yield channels_last_batch_to_model(images.to(self.device), self.dtype), tokens.to(self.device)

    def position(self) -> dict[str, Any]:
        """The resumable position: complete shards (from the stream) + consumed ids of the partial ones."""
        import torch.distributed as dist

        from orchestrator.data import stream_position

        stream = stream_position(self.monitor_name)
        def complete(key: str) -> bool:
            epoch, shard = key.split(":")
            done = stream.get("completed", {}).get(epoch, [])
            return int(epoch) < int(stream.get("epoch", 0)) or self.shard_names[int(shard)] in done

        local = {key: ids for key, ids in self.consumed.items() if not complete(key)}
        gathered: list[Any] = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
        if dist.is_initialized():
            dist.all_gather_object(gathered, (local, self.new_audit))
        else:
            gathered = [(local, self.new_audit)]
        merged: dict[str, list[int]] = defaultdict(list)
        for part in [p for p, _ in gathered] + [{k: sorted(v) for k, v in self.skip.items()}]:
            for key, ids in part.items():
                if not complete(key):
                    merged[key].extend(ids)
        self.consumed = defaultdict(list, {k: v for k, v in self.consumed.items() if not complete(k)})
        position = {"stream": stream, "consumed": {key: _ranges(ids) for key, ids in sorted(merged.items())}}
        if self.audit is not None:
            self.audit += [entry for _, entries in gathered for entry in entries]
            self.new_audit = []
            position["audit"] = self.audit
        return position

    def error_counters(self) -> dict[str, float]:
        from orchestrator.data import stream_counters

        counters = {f"data/{name}": float(value) for name, value in stream_counters(self.monitor_name).items()}
        counters["data/filtered_repeats"] = float(self.filtered_repeats)
        return counters


def _shard_names(cfg: RunConfig) -> list[str]:
    from orchestrator.data import open_shard_set

    _, manifest = open_shard_set(cfg.data.shards, cfg.data.s3_endpoint_url)
    return [shard.name for shard in manifest.shards]


def load_eval_set(cfg: RunConfig, image_size: int) -> tuple[LabelledImages, list[str]] | None:
    """The held-out labelled images (uint8, resized + center-cropped) and the prompt templates to use."""
    from orchestrator.data import load_heldout

    if not cfg.eval.enabled:
        return None
    heldout = load_heldout(cfg.data, limit=cfg.eval.max_images)
    images, labels = [], []
    for pixels, batch_labels in heldout.batches(1000, image_size, normalize=False):
        images.append(pixels)
        labels.append(batch_labels)
    templates = cfg.eval.templates or [heldout.template]
    return LabelledImages(torch.cat(images), torch.cat(labels), heldout.class_names), templates


def tokenizer_for(cfg: RunConfig):
    from models.tokenizer import get_tokenizer

    return get_tokenizer(context_length=cfg.model.spec().text.context_length)
