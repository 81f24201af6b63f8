"""The ``data`` section of a run config: where shards live and how they are streamed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from orchestrator.config.sections import ConfigSection


class DataConfig(ConfigSection):
    """The ``data`` section of a run config: where shards live and how they are streamed."""

    shards: str = "data/fashion-mnist"
    """Folder or ``s3://bucket/prefix`` holding ``manifest.json`` and the ``.tar`` shards it lists."""
    heldout: str | None = None
    """Held-out split for zero-shot eval (Fashion-MNIST); default ``<shards>/heldout``."""
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
