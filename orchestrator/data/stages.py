"""The stream's Ray Data stages: a read task per shard, and a pool of decode + augment + tokenize actors.

1. ``read_shard_rows`` (Ray task): fetch a shard whole with retries and backoff, split the tar into
   samples (``orchestrator.data.webdataset``), report the shard's counts to the monitor, emit the samples;
2. ``DecodeAugmentTokenize`` (Ray actor, ``decode_concurrency`` of them): decode, augment with the model
   library's transforms and tokenize, in batches; a corrupt image drops that sample only and is counted.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from orchestrator import storage
from orchestrator.data.monitor import get_monitor
from orchestrator.data.webdataset import ShardParse, decode_image, fetch_shard, parse_shard

SHARD_ID_BITS = 32  # sample_id = shard index << 32 | ordinal in the tar

SHARD_ID_BITS = 32  # sample_id = shard index << 32 | ordinal in the tar


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
    get_monitor(monitor_name).record_read.remote(epoch, shard_index, report)
    count = len(parse.samples)
    return {
        "image": np.array([s.image for s in parse.samples] or [], dtype=object),
        "caption": np.array([s.caption for s in parse.samples] or [], dtype=object),
        "epoch": np.full(count, epoch, dtype=np.int32),
        "shard_index": np.full(count, shard_index, dtype=np.int32),
        "sample_id": np.array([(shard_index << SHARD_ID_BITS) | s.ordinal for s in parse.samples], dtype=np.int64),
    }


class DecodeAugmentTokenize:
    """Ray Data decode stage (an actor: the tokenizer and transform are built once, ~0.5 s)."""

    def __init__(self, image_size: int, image_dtype: str, context_length: int, monitor_name: str | None,
                 train: bool = True, seed: int = 0):
        from models import get_tokenizer
        from models import image_transform

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
            get_monitor(self.monitor_name).record_decode_errors.remote(dict(dropped))
        return self._assemble(batch, keep, pixels[:len(keep)], torch)

    def _crop_seed(self, epoch: int, sample_id: int) -> int:
        return ((self.seed * 1_000_003 + epoch) << 64) + sample_id

    def _assemble(self, batch, keep, pixels, torch) -> dict[str, np.ndarray]:
        if self.image_dtype == "float32":
            from models import normalize_images

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
