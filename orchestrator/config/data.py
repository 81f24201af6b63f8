"""The ``data`` section of a run config: where shards live and how they are streamed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.config.sections import ConfigSection

ShardSpec = str | list[str]
"""A folder or ``s3://`` prefix of ``.tar`` files, a brace pattern (``s3://b/laion/{00000..41455}.tar``),
one ``.tar``, or a list of those."""


def _is_remote(value: str) -> bool:
    return value.startswith("s3://")


def _absolute(value: str, base: str | Path) -> str:
    return value if _is_remote(value) or os.path.isabs(value) else str(Path(base) / value)


def _absolute_spec(spec: ShardSpec, base: str | Path) -> ShardSpec:
    return [_absolute(item, base) for item in spec] if isinstance(spec, list) else _absolute(spec, base)


def _check_spec(spec: ShardSpec) -> ShardSpec:
    items = spec if isinstance(spec, list) else [spec]
    if not items or any(not isinstance(item, str) or not item.strip() for item in items):
        raise ValueError("shards must be a non-empty folder / s3:// prefix / brace pattern, or a non-empty list of them")
    return spec


DEFAULT_SHARDS = "data/fashion-mnist"


class DataSource(ConfigSection):
    """One source of a weighted mix (``data.sources``), as open_clip's ``::`` lists with upsampling factors."""

    shards: ShardSpec
    """Folder or ``s3://`` prefix of ``.tar`` shards, brace pattern, or a list of those."""
    weight: float = Field(default=1.0, gt=0)
    """Visits of each shard per epoch: 2 streams every shard twice an epoch, 0.5 a seeded half of them
    (a different half each epoch), 1.5 every shard once plus a seeded half again."""
    name: str | None = None
    """Name in positions, logs and MLflow metrics (``data/source/<name>/...``); default: the folder's name."""
    manifest: str | None = None
    """Where this source's ``manifest.json`` lives when not beside the shards (``prepare_data.py --index --output``)."""

    @field_validator("shards")
    @classmethod
    def _shards_named(cls, spec: ShardSpec) -> ShardSpec:
        return _check_spec(spec)

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        first = self.shards[0] if isinstance(self.shards, list) else self.shards
        folder = first.rstrip("/")
        if folder.endswith(".tar") or "{" in folder:
            folder = folder.rsplit("/", 1)[0]
        return folder.rsplit("/", 1)[-1] or "shards"


class DataConfig(ConfigSection):
    """The ``data`` section of a run config: where shards live and how they are streamed."""

    shards: ShardSpec = DEFAULT_SHARDS
    """Folder or ``s3://bucket/prefix`` of ``.tar`` shards (rayclip's or img2dataset's / any WebDataset set),
    a brace pattern (``s3://bucket/laion400m/{00000..41455}.tar``), or a list of those. Sample counts come
    from ``manifest.json``, else img2dataset's ``NNNNN_stats.json`` / ``NNNNN.parquet``, else ``sizes.json``;
    without any, ``python jobs/prepare_data.py --index <shards>`` writes a manifest."""
    manifest: str | None = None
    """``manifest.json`` location when it is not beside the shards (written with ``--index --output``)."""
    sources: list[DataSource] | None = None
    """Several shard sets mixed by weight, instead of ``shards``: ``[{shards: ..., weight: 2.0}, ...]``.
    An epoch is one pass over every source's shards, each shard visited ``weight`` times (see DataSource)."""
    caption_key: str | None = None
    """Caption from this field of each sample's ``KEY.json`` (dotted for nested fields, e.g. ``meta.alt``)
    instead of ``KEY.txt``; a sample without it is dropped and counted as ``missing_caption``."""
    heldout: str | None = None
    """Held-out split for zero-shot eval (Fashion-MNIST); default ``<shards>/heldout`` when ``shards`` is one folder."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, moto), e.g. ``http://127.0.0.1:9000``; None = AWS. Keys never go here:
    credentials come from the standard AWS chain (env, profile, instance role)."""
    image_size: int = Field(default=224, gt=0)
    """Square side in pixels of the images fed to the model (train crop / eval center crop); in a run config
    it follows the model unless set."""
    image_dtype: Literal["uint8", "float32"] = "uint8"
    """uint8: 4x less to move, normalised on the worker by ``models.transforms.channels_last_batch_to_model``;
    float32: normalised with CLIP's mean/std in the decode stage."""
    context_length: int = Field(default=77, gt=0)
    """Token ids per caption (CLIP: 77); in a run config it follows the model unless set."""
    batch_size: int = Field(default=256, gt=0)
    """Samples per batch on each training worker; in a run config it follows the DeepSpeed batch plan unless set."""
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
    read_block_samples: int = Field(default=256, gt=0)
    """Samples per block a read task passes on while it streams a shard: the read stage's memory is about
    one block, whatever the shard's size (LAION shards are 0.3-1 GB)."""
    read_ahead_batches: int | Literal["auto", "unbounded"] = "auto"
    """Batches per training worker the stream may read ahead of training (a read task opens its shard only
    below the window, so add up to one shard per read task). auto: the pipeline's own buffers (shuffle
    buffer, decode batches, read blocks) plus what training consumes in ``read_ahead_s``; unbounded:
    read as fast as Ray Data allows (benchmarks of the stream alone)."""
    read_ahead_s: float = Field(default=20.0, gt=0)
    """With ``read_ahead_batches: auto``: seconds of consumption, at the measured rate, to read ahead."""
    max_error_fraction: float = Field(default=0.01, ge=0.0, le=1.0)
    """Error budget per epoch: the stream stops once bad or lost samples exceed this fraction of the
    epoch's samples, naming the shards at fault."""
    read_retries: int = Field(default=3, ge=0)
    """Extra attempts to read a shard before it is skipped and counted (a retry resumes after the samples
    already passed on, so nothing is read twice)."""
    retry_backoff_s: float = Field(default=0.5, ge=0.0)
    """First wait between read attempts; doubles after each failure."""

    @field_validator("shards")
    @classmethod
    def _shards_named(cls, spec: ShardSpec) -> ShardSpec:
        return _check_spec(spec)

    @field_validator("read_ahead_batches")
    @classmethod
    def _positive_window(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value <= 0:
            raise ValueError("must be a positive number of batches, 'auto' or 'unbounded'")
        return value

    @model_validator(mode="after")
    def _one_way_to_name_shards(self) -> DataConfig:
        if self.sources is not None:
            if self.shards != DEFAULT_SHARDS or self.manifest is not None:
                raise ValueError("set data.sources or data.shards (+ data.manifest), not both")
            if not self.sources:
                raise ValueError("data.sources must list at least one source")
            names = [source.display_name for source in self.sources]
            if len(set(names)) != len(names):
                raise ValueError(f"data.sources need distinct names (set 'name'), got {names}")
        return self

    def source_list(self) -> list[DataSource]:
        """The sources to stream: ``sources``, or ``shards`` (+ ``manifest``) as one source of weight 1."""
        if self.sources is not None:
            return list(self.sources)
        return [DataSource(shards=self.shards, manifest=self.manifest)]

    def resolved(self, base: str | Path) -> DataConfig:
        """A copy whose relative local paths are made absolute against ``base`` (the config file's folder)."""
        updates = {} if self.sources is not None else {"shards": _absolute_spec(self.shards, base)}
        for name in ("heldout", "manifest"):
            if getattr(self, name):
                updates[name] = _absolute(getattr(self, name), base)
        if self.sources is not None:
            updates["sources"] = [source.model_copy(update={
                "shards": _absolute_spec(source.shards, base),
                **({"manifest": _absolute(source.manifest, base)} if source.manifest else {})}) for source in self.sources]
        return self.model_copy(update=updates)

    @property
    def heldout_url(self) -> str | None:
        """The held-out split: ``heldout``, else ``<shards>/heldout`` when ``shards`` names one folder."""
        if self.heldout:
            return self.heldout
        if self.sources is None and isinstance(self.shards, str) and "{" not in self.shards \
                and not self.shards.endswith(".tar"):
            return f"{self.shards.rstrip('/')}/heldout"
        return None
