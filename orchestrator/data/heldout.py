"""The labelled held-out split for zero-shot evaluation, read whole without Ray Data (a few MB)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from orchestrator.config import DataConfig
from orchestrator.data.manifest import MANIFEST_NAME, ManifestError, open_shard_set
from orchestrator.data.webdataset import ShardRead, decode_image, stream_shard


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

        from models import image_transform, normalize_images

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
        read = ShardRead()
        samples = [sample for block in stream_shard(folder.child(shard.name), read, block_samples=cfg.read_block_samples,
                                                    retries=cfg.read_retries, backoff_s=cfg.retry_backoff_s)
                   for sample in block]
        bad += shard.samples - len(samples)  # bad, lost or unreadable: all counted
        for sample in samples:
            if isinstance(sample.meta.get("label"), int):
                images.append(sample.image)
                labels.append(sample.meta["label"])
            else:
                bad += 1
        if limit is not None and len(images) >= limit:
            break
    images, labels = images[:limit], labels[:limit]
    return HeldoutSplit(images, np.asarray(labels, dtype=np.int64), list(class_names), template, bad)
