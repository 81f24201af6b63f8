"""The stream's Ray Data stages: a read task per shard, and a pool of decode + augment + tokenize actors.

1. ``read_shard_rows`` (Ray task): wait while the stream is at its read-ahead bound, then stream a shard,
   passing its samples on in blocks while it reads (``orchestrator.data.webdataset``: retries resume
   after what was passed on); report the shard's counts to the monitor at its end;
2. ``DecodeAugmentTokenize`` (Ray actor, ``decode_concurrency`` of them): decode, augment with the model
   library's transforms and tokenize, in batches; a corrupt image drops that sample only and is counted.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import numpy as np

from orchestrator import storage
from orchestrator.data.monitor import get_monitor
from orchestrator.data.webdataset import RawSample, ShardRead, decode_image, stream_shard

SHARD_ID_BITS = 32  # sample_id = visit index << 32 | ordinal in the tar
ROOM_POLL_S = 0.05  # how often a read task waiting at the read-ahead bound asks again


def _rows(samples: list[RawSample], epoch: int, visit: int) -> dict[str, np.ndarray]:
    count = len(samples)
    return {
        "image": np.array([s.image for s in samples] or [], dtype=object),
        "caption": np.array([s.caption for s in samples] or [], dtype=object),
        "epoch": np.full(count, epoch, dtype=np.int32),
        "shard_index": np.full(count, visit, dtype=np.int32),
        "sample_id": np.array([(visit << SHARD_ID_BITS) | s.ordinal for s in samples], dtype=np.int64),
    }


def read_shard_rows(plan: dict[str, np.ndarray], *, endpoint_url: str | None, caption_key: str | None,
                    block_samples: int, retries: int, backoff_s: float,
                    monitor_name: str | None) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data read stage: one plan row (epoch, visit, url, samples) in, that shard's good samples out,
    streamed in blocks of ``block_samples`` as the tar is read.

    The read-ahead bound is checked before the shard is opened, never inside it: Ray Data passes a task's
    output on in blocks of up to ``target_max_block_size`` (and a task fused with the decode actor holds
    that actor), so a task paused mid-shard could hold back the very samples training waits for.
    """
    import ray

    epoch, visit = int(plan["epoch"][0]), int(plan["visit"][0])
    monitor = get_monitor(monitor_name) if monitor_name else None
    while monitor is not None and not ray.get(monitor.has_room.remote()):
        time.sleep(ROOM_POLL_S)
    read, passed = ShardRead(), False
    location = storage.resolve(str(plan["url"][0]), endpoint_url)
    for block in stream_shard(location, read, block_samples=block_samples, caption_key=caption_key,
                              retries=retries, backoff_s=backoff_s):
        if monitor is not None:
            monitor.record_block.remote(visit, len(block))
        passed = True
        yield _rows(block, epoch, visit)
    if monitor is not None:
        monitor.record_read.remote(epoch, visit, read.report(int(plan["samples"][0])))
    if not passed:
        yield _rows([], epoch, visit)


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
