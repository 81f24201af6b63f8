"""Streaming WebDataset shards (local or S3) through Ray Data into Ray Train workers, robust to bad data.

Why not ``ray.data.read_webdataset``: its default decoder fails the whole read on one bad JPEG, and with
``max_errored_blocks`` it drops the whole shard. Here the stream is built from three small stages:

1. a plan: one row per (epoch, shard) for every epoch still to run, shard order permuted per epoch from
   ``seed`` (shards already consumed before a checkpoint are left out);
2. a read stage (Ray tasks): fetch a shard whole with retries and backoff, split the tar into samples,
   drop and count samples with no caption, no image or bad JSON, keep what precedes damage in a
   truncated tar, skip and count a shard that stays unreadable;
3. a decode stage (a pool of ``decode_concurrency`` Ray actors): decode, augment with the model library's
   transforms and tokenize, in batches; a corrupt image drops that sample only.

Counts go to one :class:`DataStreamMonitor` actor; training workers report what they consumed to it, so it
knows which shards are fully consumed (the resumable position) and whether the error budget is exceeded.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from orchestrator import storage
from orchestrator.shards import MANIFEST_NAME, Manifest, ManifestError, parse_manifest

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SAMPLE_ERRORS = ("missing_caption", "missing_image", "bad_json", "decode_error")
SHARD_ID_BITS = 32  # sample_id = shard index << 32 | ordinal in the tar
MONITOR_NAMESPACE = "rayclip-data"  # explicit, so Train workers and Data actors find the monitor by name


class DataConfig(BaseModel):
    """The ``data`` section of a run config: where shards live and how they are streamed."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    shards: str = "data/fashion-mnist"
    """Folder or ``s3://bucket/prefix`` holding ``manifest.json`` and the ``.tar`` shards it lists."""
    heldout: str | None = None
    """Held-out split for zero-shot eval (Fashion-MNIST); default ``<shards>/heldout``."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, moto), e.g. ``http://127.0.0.1:9000``; None = AWS. Keys never go here:
    credentials come from the standard AWS chain (env, profile, instance role)."""
    image_size: int = Field(default=224, gt=0)
    """Square side in pixels of the images fed to the model (train crop / eval center crop)."""
    image_dtype: Literal["uint8", "float32"] = "uint8"
    """uint8: 4x less to move, normalised on the worker by ``models.transforms.channels_last_batch_to_model``;
    float32: normalised with CLIP's mean/std in the decode stage."""
    context_length: int = Field(default=77, gt=0)
    """Token ids per caption (CLIP: 77)."""
    batch_size: int = Field(default=256, gt=0)
    """Samples per batch on each training worker."""
    shuffle_buffer: int = Field(default=2048, ge=0)
    """Samples in each worker's local shuffle buffer (0 disables it); shard order is reshuffled anyway."""
    seed: int = 0
    """Seed of the per-epoch shard permutation, the shuffle buffer and the random crops (a sample's crop
    is a function of seed, epoch and sample id)."""
    decode_concurrency: int = Field(default=2, ge=1)
    """Ray actors that decode, augment and tokenize (each holds one CPU)."""
    decode_batch_size: int = Field(default=64, gt=0)
    """Samples per decode call (larger amortises per-call overhead, smaller streams sooner)."""
    read_concurrency: int | None = Field(default=None, ge=1)
    """Shards read at once (None: let Ray Data decide)."""
    max_error_fraction: float = Field(default=0.01, ge=0.0, le=1.0)
    """Error budget per epoch: the stream stops once bad or lost samples exceed this fraction of the
    manifest's samples, naming the shards at fault."""
    read_retries: int = Field(default=3, ge=0)
    """Extra attempts to read a shard before it is skipped and counted."""
    retry_backoff_s: float = Field(default=0.5, ge=0.0)
    """First wait between read attempts; doubles after each failure."""

    def resolved(self, base: str | Path) -> DataConfig:
        """A copy whose relative local paths are made absolute against ``base`` (the config file's folder)."""
        updates = {}
        for name in ("shards", "heldout"):
            value = getattr(self, name)
            if value and not value.startswith("s3://") and not os.path.isabs(value):
                updates[name] = str(Path(base) / value)
        return self.model_copy(update=updates)

    @property
    def heldout_url(self) -> str:
        return self.heldout or f"{self.shards.rstrip('/')}/heldout"


class DataErrorBudgetExceeded(RuntimeError):
    """Too many bad samples or lost shards in one epoch; the message names the shards at fault."""


def open_shard_set(url: str, endpoint_url: str | None = None) -> tuple[storage.Location, Manifest]:
    """Check a shard folder before any work: bucket, prefix, manifest and at least one listed shard exist."""
    folder = storage.resolve(url, endpoint_url)
    storage.ensure_folder(folder, create=False)
    present = storage.list_names(folder)
    if not present:
        raise storage.StorageError(f"{folder.url} holds no files (wrong prefix?)")
    if MANIFEST_NAME not in present:
        raise ManifestError(f"{folder.url} has no {MANIFEST_NAME}; write shards with jobs/prepare_data.py")
    manifest = parse_manifest(storage.read_bytes(folder.child(MANIFEST_NAME)), folder.child(MANIFEST_NAME).url)
    listed = [shard.name for shard in manifest.shards]
    missing = [name for name in listed if name not in present]
    if len(missing) == len(listed):
        raise ManifestError(f"no shard listed in {folder.url}/{MANIFEST_NAME} exists there "
                            f"(first listed: {listed[0]}; files found: {sorted(present)[:5]})")
    if missing:
        logger.warning("%d shard(s) of %s are missing and will be skipped: %s", len(missing), folder.url, missing[:10])
    return folder, manifest


@dataclass
class RawSample:
    """One sample as stored: encoded image bytes, caption, metadata and its ordinal in the tar."""

    ordinal: int
    key: str
    image: bytes
    caption: str
    meta: dict


@dataclass
class ShardParse:
    samples: list[RawSample] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    truncated: bool = False


def _sample_from_members(ordinal: int, key: str, members: dict[str, bytes], parse: ShardParse) -> None:
    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    caption = members.get("txt", b"").decode("utf-8", errors="replace").strip()
    if image is None:
        parse.errors["missing_image"] += 1
        return
    if not caption:
        parse.errors["missing_caption"] += 1
        return
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            parse.errors["bad_json"] += 1
            return
    parse.samples.append(RawSample(ordinal, key, image, caption, meta if isinstance(meta, dict) else {}))


def parse_shard(data: bytes) -> ShardParse:
    """Split a WebDataset tar into samples (members grouped by key = name up to the first dot).

    A tar damaged part-way keeps every complete sample before the damage and sets ``truncated``.
    """
    parse, ordinal = ShardParse(), 0
    key, members = None, {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                member_key, _, extension = base.partition(".")
                member_key = f"{directory}/{member_key}" if directory else member_key
                if member_key != key and key is not None:
                    _sample_from_members(ordinal, key, members, parse)
                    ordinal, members = ordinal + 1, {}
                key = member_key
                members[extension.lower()] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError):
        parse.truncated = True
        members = {}  # the sample being read when the damage hit is incomplete
    if key is not None and members:
        _sample_from_members(ordinal, key, members, parse)
    return parse


def fetch_shard(location: storage.Location, retries: int, backoff_s: float) -> tuple[bytes | None, int, str | None]:
    """Read a whole shard, retrying with exponential backoff: (bytes or None, failed attempts, last error)."""
    error = None
    for attempt in range(retries + 1):
        try:
            return storage.read_bytes(location), attempt, None
        except (OSError, storage.StorageError) as exc:  # pyarrow raises OSError subclasses for S3 and disk errors
            error = f"{type(exc).__name__}: {exc}"
            if attempt < retries:
                time.sleep(backoff_s * (2 ** attempt))
    return None, retries + 1, error


def _get_monitor(name: str):
    import ray

    return ray.get_actor(name, namespace=MONITOR_NAMESPACE)


def read_shard_rows(plan: dict[str, np.ndarray], *, folder_url: str, endpoint_url: str | None,
                    shard_names: list[str], shard_samples: list[int], retries: int, backoff_s: float,
                    monitor_name: str) -> dict[str, np.ndarray]:
    """Ray Data read stage: one plan row (epoch, shard_index) in, that shard's good raw samples out."""
    epoch, shard_index = int(plan["epoch"][0]), int(plan["shard_index"][0])
    location = storage.resolve(folder_url, endpoint_url).child(shard_names[shard_index])
    data, failed_attempts, error = fetch_shard(location, retries, backoff_s)
    parse = parse_shard(data) if data is not None else ShardParse()
    bad = sum(parse.errors.values())
    report = {"yielded": len(parse.samples), "errors": dict(parse.errors), "truncated": parse.truncated,
              "skipped": data is None, "failed_attempts": failed_attempts, "error": error,
              "lost": max(0, shard_samples[shard_index] - len(parse.samples) - bad)}
    _get_monitor(monitor_name).record_read.remote(epoch, shard_index, report)
    count = len(parse.samples)
    return {
        "image": np.array([s.image for s in parse.samples] or [], dtype=object),
        "caption": np.array([s.caption for s in parse.samples] or [], dtype=object),
        "epoch": np.full(count, epoch, dtype=np.int32),
        "shard_index": np.full(count, shard_index, dtype=np.int32),
        "sample_id": np.array([(shard_index << SHARD_ID_BITS) | s.ordinal for s in parse.samples], dtype=np.int64),
    }


def decode_image(encoded: bytes):
    """Decode JPEG/PNG/WebP bytes to a (3, H, W) uint8 tensor (torchvision's libjpeg-turbo path is ~1.7x
    faster than PIL + numpy here, and hands the transform a tensor without a copy); raises on bad data."""
    import torch
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as decode

    return decode(torch.frombuffer(bytearray(encoded), dtype=torch.uint8), mode=ImageReadMode.RGB)


class DecodeAugmentTokenize:
    """Ray Data decode stage (an actor: the tokenizer and transform are built once, ~0.5 s)."""

    def __init__(self, image_size: int, image_dtype: str, context_length: int, monitor_name: str | None,
                 train: bool = True, seed: int = 0):
        from models.tokenizer import get_tokenizer
        from models.transforms import image_transform

        self.image_size, self.image_dtype, self.seed = image_size, image_dtype, seed
        self.transform = image_transform(image_size, train=train, normalize=False)
        self.tokenizer = get_tokenizer(context_length=context_length)
        self.context_length = context_length
        self.monitor_name = monitor_name

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        size = self.image_size
        # Channels-last, the decoder's own layout: the resampler reads and writes it, so each image is
        # written with a plain copy; the transpose to (3, R, R) runs on the training device, for free.
        pixels = torch.empty((len(batch["image"]), size, size, 3), dtype=torch.uint8)
        keep, dropped = [], Counter()
        for row, encoded in enumerate(batch["image"]):
            try:
                # A sample's crop depends on (seed, epoch, sample id) alone: reproducible, and the same
                # whichever actor or batch it lands in (a resumed run sees the same augmentation).
                self.transform.rng.seed(self._crop_seed(int(batch["epoch"][row]), int(batch["sample_id"][row])))
                self.transform.into(decode_image(encoded), pixels[len(keep)].permute(2, 0, 1))
                keep.append(row)
            except Exception:  # any decoder error means this sample only is bad
                dropped[(int(batch["epoch"][row]), int(batch["shard_index"][row]))] += 1
        if dropped and self.monitor_name:
            _get_monitor(self.monitor_name).record_decode_errors.remote(dict(dropped))
        return self._assemble(batch, keep, pixels[:len(keep)], torch)

    def _crop_seed(self, epoch: int, sample_id: int) -> int:
        return ((self.seed * 1_000_003 + epoch) << 64) + sample_id

    def _assemble(self, batch, keep, pixels, torch) -> dict[str, np.ndarray]:
        if self.image_dtype == "float32":
            from models.transforms import normalize_images

            pixels = normalize_images(pixels.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()
        captions = [str(batch["caption"][row]) for row in keep]
        tokens = self.tokenizer(captions) if captions else torch.zeros((0, self.context_length), dtype=torch.long)
        index = np.asarray(keep, dtype=np.int64)
        return {
            "image": pixels.numpy(),  # (B, R, R, 3)
            "text": tokens.numpy().astype(np.int64),  # (B, context_length)
            "epoch": batch["epoch"][index],
            "shard_index": batch["shard_index"][index],
            "sample_id": batch["sample_id"][index],
        }


class DataStreamMonitor:
    """Counts of the stream (run as one Ray actor): what each shard yielded, lost and had consumed.

    A shard of an epoch is *complete* once its consumed + decode-dropped samples reach what the read stage
    yielded; the set of complete shards is the resumable position. Bad or lost samples are charged to their
    epoch; past ``max_error_fraction`` of the manifest's samples the monitor records a failure naming the
    shards, which every consumer then raises.
    """

    def __init__(self, shard_names: list[str], samples_per_epoch: int, max_error_fraction: float,
                 first_epoch: int = 0, completed: dict[int, list[str]] | None = None):
        self.shard_names = shard_names
        self.samples_per_epoch = samples_per_epoch
        self.max_error_fraction = max_error_fraction
        self.first_epoch = first_epoch
        index = {name: i for i, name in enumerate(shard_names)}
        self.complete = {(int(e), index[n]) for e, names in (completed or {}).items() for n in names}
        self.yielded, self.dropped, self.consumed = {}, Counter(), Counter()
        self.counters = Counter()
        self.bad_by_epoch = Counter()
        self.shard_problems: dict[str, list[str]] = defaultdict(list)
        self.failure: str | None = None

    def record_read(self, epoch: int, shard: int, report: dict) -> None:
        self.yielded[(epoch, shard)] = report["yielded"]
        name = self.shard_names[shard]
        for kind, count in report["errors"].items():
            self._charge(epoch, name, kind, count)
        self.counters["shards_read"] += 1
        self.counters["read_retries"] += report["failed_attempts"] - int(report["skipped"])
        self.counters["samples_read"] += report["yielded"]
        if report["skipped"]:
            self.counters["skipped_shards"] += 1
            self._charge(epoch, name, "samples_in_skipped_shards", report["lost"], report["error"])
        elif report["truncated"]:
            self.counters["truncated_shards"] += 1
            self._charge(epoch, name, "samples_lost_to_truncation", report["lost"])
        self._update_completion(epoch, shard)

    def record_decode_errors(self, dropped: dict[tuple[int, int], int]) -> None:
        for (epoch, shard), count in dropped.items():
            self.dropped[(epoch, shard)] += count
            self._charge(epoch, self.shard_names[shard], "decode_error", count)
            self._update_completion(epoch, shard)

    def record_consumed(self, consumed: dict[tuple[int, int], int]) -> str | None:
        for (epoch, shard), count in consumed.items():
            self.consumed[(epoch, shard)] += count
            self.counters["samples_consumed"] += count
            self._update_completion(epoch, shard)
        return self.failure

    def _charge(self, epoch: int, shard_name: str, kind: str, count: int, detail: str | None = None) -> None:
        if count <= 0:
            return
        self.counters[kind] += count
        self.bad_by_epoch[epoch] += count
        self.shard_problems[shard_name].append(f"epoch {epoch}: {count} {kind}" + (f" ({detail})" if detail else ""))
        limit = self.max_error_fraction * self.samples_per_epoch
        if self.failure is None and self.bad_by_epoch[epoch] > limit:
            shards = "; ".join(f"{name}: {', '.join(problems)}" for name, problems in self.shard_problems.items())
            self.failure = (f"data error budget exceeded in epoch {epoch}: {self.bad_by_epoch[epoch]} bad or lost "
                            f"samples > max_error_fraction={self.max_error_fraction} of {self.samples_per_epoch}; "
                            f"shards: {shards}")

    def _update_completion(self, epoch: int, shard: int) -> None:
        key = (epoch, shard)
        if key in self.yielded and self.consumed[key] + self.dropped[key] >= self.yielded[key]:
            self.complete.add(key)

    def get_failure(self) -> str | None:
        return self.failure

    def get_counters(self) -> dict[str, int]:
        """Error and progress counters, flat, for MLflow (``data/<name>``)."""
        names = ("shards_read", "samples_read", "samples_consumed", "read_retries", "skipped_shards",
                 "truncated_shards", "samples_lost_to_truncation", "samples_in_skipped_shards", *SAMPLE_ERRORS)
        return {name: int(self.counters[name]) for name in names}

    def get_problem_shards(self) -> dict[str, list[str]]:
        return dict(self.shard_problems)

    def get_position(self) -> dict[str, Any]:
        """JSON-able position: the first epoch with unconsumed shards and the shards complete from it on."""
        epoch = self.first_epoch
        while all((epoch, shard) in self.complete for shard in range(len(self.shard_names))):
            epoch += 1
        completed: dict[str, list[str]] = defaultdict(list)
        for done_epoch, shard in sorted(self.complete):
            if done_epoch >= epoch:
                completed[str(done_epoch)].append(self.shard_names[shard])
        return {"epoch": epoch, "completed": dict(completed)}


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard permutation of one epoch: a pure function of (seed, epoch), so a resumed run replays it."""
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_shards)]


def plan_epochs(shard_names: list[str], seed: int, epochs: int, position: dict | None = None) -> list[dict]:
    """(epoch, shard_index) rows still to stream, from ``position`` (see :meth:`DataStreamMonitor.get_position`)."""
    position = position or {"epoch": 0, "completed": {}}
    index = {name: i for i, name in enumerate(shard_names)}
    unknown = [n for names in position.get("completed", {}).values() for n in names if n not in index]
    if unknown:
        raise ValueError(f"data position names shards not in the manifest: {unknown[:5]}")
    rows = []
    for epoch in range(int(position.get("epoch", 0)), epochs):
        done = {index[n] for n in position.get("completed", {}).get(str(epoch), [])}
        order = shard_order(len(shard_names), seed, epoch)
        rows += [{"epoch": epoch, "shard_index": shard} for shard in order if shard not in done]
    return rows


@dataclass
class TrainStream:
    """What :func:`build_train_dataset` returns: the dataset plus what the training loop needs to know."""

    dataset: Any  # ray.data.Dataset of {"image", "text", "epoch", "shard_index", "sample_id"}
    monitor_name: str  # pass to workers: iter_train_batches / stream_counters / stream_position
    monitor: Any  # the actor handle; holding it keeps the monitor alive as long as the stream
    samples_per_epoch: int
    num_shards: int
    epochs: int


def control_actor_options(name: str, namespace: str) -> dict[str, Any]:
    """Options for a named bookkeeping actor: no CPU, and on the node of the process that creates it.

    The stream's actors are created by Ray Train's controller, which Ray keeps on the driver's node. Left
    to the default scheduler they can land on a training node, and dying with that node they would take
    the stream's position and counters with them, so no restarted worker group could start.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return dict(name=name, namespace=namespace, num_cpus=0, scheduling_strategy=here)


def build_train_dataset(cfg: DataConfig, *, epochs: int, position: dict | None = None,
                        train: bool = True) -> TrainStream:
    """The training stream over ``epochs`` epochs (resuming at ``position``), checked before any work.

    Pass ``stream.dataset`` to ``TorchTrainer(datasets={"train": ...}, dataset_config=exact_once_data_config())``
    and ``stream.monitor_name`` to the workers, which iterate with :func:`iter_train_batches`.
    """
    import ray

    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    folder, manifest = open_shard_set(cfg.shards, cfg.s3_endpoint_url)
    names = [shard.name for shard in manifest.shards]
    plan = plan_epochs(names, cfg.seed, epochs, position)
    monitor_name = f"rayclip-data-monitor-{uuid.uuid4().hex[:12]}"
    first_epoch = int((position or {}).get("epoch", 0))
    monitor = ray.remote(DataStreamMonitor).options(**control_actor_options(monitor_name, MONITOR_NAMESPACE)).remote(
        names, manifest.total_samples, cfg.max_error_fraction, first_epoch, (position or {}).get("completed"))
    read_kwargs = dict(folder_url=folder.url, endpoint_url=cfg.s3_endpoint_url, shard_names=names,
                       shard_samples=[shard.samples for shard in manifest.shards], retries=cfg.read_retries,
                       backoff_s=cfg.retry_backoff_s, monitor_name=monitor_name)
    read_compute = ray.data.TaskPoolStrategy(size=cfg.read_concurrency) if cfg.read_concurrency else None
    dataset = (
        ray.data.from_items(plan, override_num_blocks=max(1, len(plan)))
        .map_batches(read_shard_rows, batch_size=1, fn_kwargs=read_kwargs, compute=read_compute)
        .map_batches(DecodeAugmentTokenize, batch_size=cfg.decode_batch_size,
                     fn_constructor_kwargs=dict(image_size=cfg.image_size, image_dtype=cfg.image_dtype,
                                                context_length=cfg.context_length, monitor_name=monitor_name,
                                                train=train, seed=cfg.seed),
                     compute=ray.data.ActorPoolStrategy(size=cfg.decode_concurrency))
    )
    return TrainStream(dataset, monitor_name, monitor, manifest.total_samples, len(names), epochs)


def iter_train_batches(dataset_shard, cfg: DataConfig, monitor_name: str, *, rank: int = 0,
                       device: str = "cpu") -> Iterator[dict]:
    """Torch batches for one worker, reporting what it consumed; raises once the error budget is exceeded.

    ``dataset_shard`` is ``ray.train.get_dataset_shard("train")`` (or the Dataset itself on the driver).
    Batches hold ``image`` (B, R, R, 3) channels-last (``models.transforms.channels_last_batch_to_model``
    makes the model's normalised (B, 3, R, R) on the training device), ``text`` (B, ctx) int64 and ``epoch`` / ``shard_index`` /
    ``sample_id``; near an epoch boundary one batch can hold samples of two epochs.
    """
    import ray

    monitor = _get_monitor(monitor_name)
    batches = dataset_shard.iter_torch_batches(
        batch_size=cfg.batch_size, local_shuffle_buffer_size=cfg.shuffle_buffer or None,
        local_shuffle_seed=cfg.seed + rank if cfg.shuffle_buffer else None, device=device)
    for batch in batches:
        counts = Counter(zip(batch["epoch"].tolist(), batch["shard_index"].tolist()))
        failure = ray.get(monitor.record_consumed.remote(dict(counts)))
        if failure:
            raise DataErrorBudgetExceeded(failure)
        yield batch
    failure = ray.get(monitor.get_failure.remote())
    if failure:
        raise DataErrorBudgetExceeded(failure)


def stream_counters(monitor_name: str) -> dict[str, int]:
    """Error/progress counters of a stream, e.g. to log as MLflow metrics ``data/<name>``."""
    import ray

    return ray.get(_get_monitor(monitor_name).get_counters.remote())


def stream_position(monitor_name: str) -> dict[str, Any]:
    """The resumable position to save in a checkpoint and pass back as ``build_train_dataset(position=...)``."""
    import ray

    return ray.get(_get_monitor(monitor_name).get_position.remote())


def exact_once_data_config():
    """A Ray Train ``DataConfig`` that splits the stream without dropping rows (Train's default split is
    ``equal=True``, which drops up to world_size - 1 rows at the end to even out the workers).

    With it, workers may get a few batches more or fewer than each other: a loop that runs collectives
    must stop every rank when the first one runs out.
    """
    from ray.train import DataConfig as TrainDataConfig

    class ExactOnceDataConfig(TrainDataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, dataset in datasets.items():
                dataset = dataset.copy(dataset)
                dataset.context.execution_options = self._resolve_execution_options(name)
                for rank, split in enumerate(dataset.streaming_split(world_size, equal=False)):
                    output[rank][name] = split
            return output

    return ExactOnceDataConfig()


@dataclass
class HeldoutSplit:
    """The zero-shot evaluation split: encoded images, labels, class names and the held-out template."""

    images: list[bytes]
    labels: np.ndarray
    class_names: list[str]
    template: str
    bad_samples: int = 0

    def batches(self, batch_size: int, image_size: int, *, normalize: bool = True) -> Iterator[tuple]:
        """(images (B, 3, R, R), labels (B,)) torch batches with the eval transform (resize + center crop)."""
        import torch

        from models.transforms import image_transform, normalize_images

        transform = image_transform(image_size, train=False)
        for start in range(0, len(self.images), batch_size):
            chunk = self.images[start:start + batch_size]
            pixels = torch.empty((len(chunk), 3, image_size, image_size), dtype=torch.uint8)
            for slot, encoded in zip(pixels, chunk):
                transform.into(decode_image(encoded), slot)
            yield (normalize_images(pixels) if normalize else pixels), torch.as_tensor(
                self.labels[start:start + batch_size], dtype=torch.long)


def load_heldout(cfg: DataConfig, *, limit: int | None = None) -> HeldoutSplit:
    """Read the held-out shards (a few MB for Fashion-MNIST) without Ray Data, on a worker or the driver."""
    folder, manifest = open_shard_set(cfg.heldout_url, cfg.s3_endpoint_url)
    class_names, template = manifest.extra.get("class_names"), manifest.extra.get("template")
    if not class_names or not template:
        raise ManifestError(f"{folder.url}/{MANIFEST_NAME}: extra.class_names and extra.template are required "
                            "for a held-out split (write it with prepare_data.py --input fashion-mnist)")
    images, labels, bad = [], [], 0
    for shard in manifest.shards:
        data, _, _ = fetch_shard(folder.child(shard.name), cfg.read_retries, cfg.retry_backoff_s)
        parse = parse_shard(data) if data is not None else ShardParse()
        bad += sum(parse.errors.values()) + (shard.samples - len(parse.samples) - sum(parse.errors.values()))
        for sample in parse.samples:
            if isinstance(sample.meta.get("label"), int):
                images.append(sample.image)
                labels.append(sample.meta["label"])
            else:
                bad += 1
        if limit is not None and len(images) >= limit:
            break
    images, labels = images[:limit], labels[:limit]
    return HeldoutSplit(images, np.asarray(labels, dtype=np.int64), list(class_names), template, bad)
