"""Turning captioned images into WebDataset shards in img2dataset's layout, in parallel on Ray, resumably.

Layout of an output folder (local or ``s3://bucket/prefix``)::

    00000.tar            KEY.jpg + KEY.txt (caption) + KEY.json (metadata) per sample
    00000.parquet        one row per input record, failures included (img2dataset's per-shard table)
    00000_stats.json     written last: its presence marks the shard complete, so re-runs keep it
    manifest.json        shard names and sample counts (epochs and LR schedules need a length)
    prepare_report.json  every input that could not be read, with the reason

Inputs are lists of :class:`~orchestrator.data.sources.SourceRecord` (captioned folder, table file,
Fashion-MNIST). An unreadable image is recorded as a failure and never stops the job. The driver of
``jobs/prepare_data.py`` (its flags parsed in ``jobs.cli``) runs :func:`prepare_dataset`,
which checks every input before Ray starts; each shard is written by one Ray task.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import numpy as np
from PIL import Image

from orchestrator import storage
from orchestrator.data.manifest import MANIFEST_NAME, Manifest, ShardEntry, write_manifest
from orchestrator.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_HELDOUT_TEMPLATE,
    FASHION_MNIST_TEMPLATES,
    FOLDER_IMAGE_SUFFIXES,
    TABLE_SUFFIXES,
    SourceRecord,
    captioned_folder_records,
    fashion_mnist_records,
    table_records,
)
from orchestrator import noise
from orchestrator.logs import get_logger

logger = get_logger("data")

REPORT_NAME = "prepare_report.json"
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


@dataclass(frozen=True)
class ShardOptions:
    """How images are written: the longest side is capped at ``max_side`` (aspect kept, never upscaled)."""

    shard_size: int = 10_000
    max_side: int = 256
    image_format: str = "jpg"
    quality: int = 95

    def __post_init__(self) -> None:
        if self.shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {self.shard_size}")
        if self.max_side <= 0:
            raise ValueError(f"max_side must be positive, got {self.max_side}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {self.image_format!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")


@dataclass
class ShardResult:
    """What one shard task produced; ``kept`` means an earlier complete run of it was reused."""

    name: str
    samples: int
    failed: int
    failures: list[dict] = field(default_factory=list)
    kept: bool = False


def load_image(record: SourceRecord, endpoint_url: str | None) -> Image.Image:
    """Open a record's image (in-memory array, local file or s3:// object) as RGB; raises on bad data."""
    if isinstance(record.image, np.ndarray):
        return Image.fromarray(record.image).convert("RGB")
    raw = storage.read_bytes(storage.resolve(record.image, endpoint_url))
    image = Image.open(io.BytesIO(raw))
    image.load()
    if image.mode in ("RGBA", "LA", "P"):
        # Transparent clip-art (Tux Paint stamps) reads as intended on white, not on black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_to_max_side(image: Image.Image, max_side: int) -> Image.Image:
    width, height = image.size
    scale = max_side / max(width, height)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def encode_image(image: Image.Image, options: ShardOptions) -> bytes:
    buffer = io.BytesIO()
    save_args = {"quality": options.quality} if options.image_format in ("jpg", "webp") else {}
    image.save(buffer, format=IMAGE_FORMATS[options.image_format], **save_args)
    return buffer.getvalue()


def _add_member(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # same inputs give byte-identical shards
    archive.addfile(info, io.BytesIO(payload))


def _record_row(record: SourceRecord, key: str, status: str, error: str | None, sizes: tuple) -> dict:
    original, final = sizes
    return {
        "key": key,
        "caption": record.caption,
        "url": record.source,
        "status": status,
        "error_message": error,
        "original_width": original[0] if original else None,
        "original_height": original[1] if original else None,
        "width": final[0] if final else None,
        "height": final[1] if final else None,
        **record.meta,
    }


def build_shard(shard_index: int, records: Sequence[SourceRecord], options: ShardOptions,
                endpoint_url: str | None = None) -> tuple[bytes, bytes, list[dict]]:
    """Encode one shard in memory: (tar bytes, parquet bytes, failures). Bad images become failures."""
    tar_buffer = io.BytesIO()
    rows, failures = [], []
    key_digits = max(4, len(str(options.shard_size - 1)))
    with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for position, record in enumerate(records):
            key = f"{shard_index:05d}{position:0{key_digits}d}"
            try:
                if not record.caption:
                    raise ValueError("the source has no caption for this image")
                image = load_image(record, endpoint_url)
                original = image.size
                image = resize_to_max_side(image, options.max_side)
                payload = encode_image(image, options)
            except Exception as error:  # any decoder/IO failure: record it, keep going
                message = f"{type(error).__name__}: {error}"
                failures.append({"key": key, "source": record.source, "error": message})
                rows.append(_record_row(record, key, "failed_to_read", message, (None, None)))
                continue
            row = _record_row(record, key, "success", None, (original, image.size))
            _add_member(archive, f"{key}.{options.image_format}", payload)
            _add_member(archive, f"{key}.txt", record.caption.encode("utf-8"))
            _add_member(archive, f"{key}.json", json.dumps(row, sort_keys=True).encode("utf-8"))
            rows.append(row)
    parquet_buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), parquet_buffer)
    return tar_buffer.getvalue(), parquet_buffer.getvalue(), failures


def shard_fingerprint(records: Sequence[SourceRecord], options: ShardOptions) -> str:
    """Identifies a shard's inputs and options, so a resumed run reuses a shard only if it would be identical."""
    digest = hashlib.sha256(json.dumps(asdict(options), sort_keys=True).encode())
    for record in records:
        digest.update(f"{record.source}\x00{record.caption}\x00".encode())
    return digest.hexdigest()


def write_shard(output_url: str, endpoint_url: str | None, shard_index: int,
                records: Sequence[SourceRecord], options: ShardOptions) -> ShardResult:
    """Write (or keep, if already complete with the same fingerprint) one shard and its sidecars."""
    output = storage.resolve(output_url, endpoint_url)
    name = f"{shard_index:05d}"
    stats_location = output.child(f"{name}_stats.json")
    fingerprint = shard_fingerprint(records, options)
    if storage.exists(stats_location):
        stats = json.loads(storage.read_bytes(stats_location))
        if stats.get("fingerprint") == fingerprint and storage.exists(output.child(f"{name}.tar")):
            return ShardResult(f"{name}.tar", stats["samples"], stats["failed"], stats["failures"], kept=True)
    tar_bytes, parquet_bytes, failures = build_shard(shard_index, records, options, endpoint_url)
    storage.write_bytes(output.child(f"{name}.tar"), tar_bytes)
    storage.write_bytes(output.child(f"{name}.parquet"), parquet_bytes)
    samples = len(records) - len(failures)
    stats = {"samples": samples, "failed": len(failures), "failures": failures, "fingerprint": fingerprint}
    storage.write_bytes(stats_location, json.dumps(stats).encode("utf-8"))
    return ShardResult(f"{name}.tar", samples, len(failures), failures)


class ShardProgress:
    """The default progress report of :func:`prepare_shards`: one line per finished shard, with an ETA."""

    def __init__(self, output_url: str):
        self.output_url, self.started = output_url, time.monotonic()

    def __call__(self, done: int, total: int, samples: int, failed: int) -> None:
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (total - done) if done else 0.0
        logger.info("%s: shard %d/%d, %d samples written, %d failed, %.0f s elapsed, ETA %.0f s",
                    self.output_url, done, total, samples, failed, elapsed, eta)


def prepare_shards(records: Sequence[SourceRecord], output_url: str, options: ShardOptions, *,
                   endpoint_url: str | None = None, workers: int = 2, extra: dict | None = None,
                   progress: Callable[[int, int, int, int], None] | None = None) -> Manifest:
    """Write all shards with at most ``workers`` Ray tasks in flight, then the manifest and the report.

    Ray must already be initialised (the caller decides: local or a cluster address). ``progress`` is
    called after each shard with (done, total, samples, failed); by default it logs a line with an ETA.
    """
    import ray

    if not records:
        raise ValueError(f"no input records to write to {output_url}")
    if workers <= 0:
        raise ValueError(f"workers must be positive, got {workers}")
    output = storage.resolve(output_url, endpoint_url)
    storage.ensure_folder(output, create=True)
    progress = progress or ShardProgress(output.url)
    remote_write = ray.remote(num_cpus=1, max_retries=2)(write_shard)
    groups = [records[start:start + options.shard_size] for start in range(0, len(records), options.shard_size)]
    pending, results, next_group = {}, {}, 0
    started = time.monotonic()
    while next_group < len(groups) or pending:
        while next_group < len(groups) and len(pending) < workers:
            ref = remote_write.remote(output_url, endpoint_url, next_group, groups[next_group], options)
            pending[ref] = next_group
            next_group += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
        results[pending.pop(ready[0])] = ray.get(ready[0])
        progress(len(results), len(groups), sum(r.samples for r in results.values()),
                 sum(r.failed for r in results.values()))
    ordered = [results[index] for index in range(len(groups))]
    manifest = Manifest(
        shards=[ShardEntry(r.name, r.samples, r.failed) for r in ordered],
        image_format=options.image_format,
        max_side=options.max_side,
        extra=extra or {},
    )
    failures = [failure for r in ordered for failure in r.failures]
    report = {"records": len(records), "written": manifest.total_samples, "failed": len(failures),
              "kept_shards": sum(r.kept for r in ordered), "seconds": round(time.monotonic() - started, 2),
              "failures": failures}
    storage.write_bytes(output.child(REPORT_NAME), json.dumps(report, indent=1).encode("utf-8"))
    write_manifest(output.child(MANIFEST_NAME), manifest)
    return manifest


def fashion_mnist_splits(output_url: str, *, templates: Sequence[str] = FASHION_MNIST_TEMPLATES,
                         heldout_template: str = FASHION_MNIST_HELDOUT_TEMPLATE, root: str = FASHION_MNIST_DIR,
                         limit: int | None = None, seed: int = 0) -> list[tuple[list[SourceRecord], str, dict]]:
    """(records, output, manifest extras) of the demo data: the training split captioned with ``templates``
    at ``output_url``, the test split captioned with ``heldout_template`` under ``<output>/heldout``."""
    if heldout_template in templates:
        raise ValueError(f"heldout_template {heldout_template!r} must not be one of the training templates")
    train = fashion_mnist_records("train", root=root, templates=templates, seed=seed)[:limit]
    test = fashion_mnist_records("test", root=root, templates=[heldout_template], seed=seed)[:limit]
    common = {"class_names": list(FASHION_MNIST_CLASSES), "source": "fashion-mnist"}
    return [(train, output_url, {**common, "templates": list(templates), "heldout_template": heldout_template}),
            (test, f"{output_url.rstrip('/')}/heldout", {**common, "template": heldout_template})]


def prepare_fashion_mnist(output_url: str, options: ShardOptions, *, templates: Sequence[str] = FASHION_MNIST_TEMPLATES,
                          heldout_template: str = FASHION_MNIST_HELDOUT_TEMPLATE, root: str = FASHION_MNIST_DIR,
                          limit: int | None = None, seed: int = 0, **prepare_args) -> tuple[Manifest, Manifest]:
    """The demo data: 60k training images captioned with ``templates``, and the 10k test images under
    ``<output>/heldout`` captioned with ``heldout_template`` (which training never sees) for zero-shot eval."""
    splits = fashion_mnist_splits(output_url, templates=templates, heldout_template=heldout_template, root=root,
                                  limit=limit, seed=seed)
    train, heldout = (prepare_shards(records, url, options, extra=extra, **prepare_args)
                      for records, url, extra in splits)
    return train, heldout


def prepare_dataset(input_spec: str, output_url: str, options: ShardOptions, *, endpoint_url: str | None = None,
                    workers: int = 2, image_column: str = "image", caption_column: str = "caption",
                    limit: int | None = None) -> list[Manifest]:
    """What ``jobs/prepare_data.py`` runs: pick the source from ``input_spec`` (``fashion-mnist``, a table
    file, or a captioned folder), start a local Ray unless one is already up (or ``RAY_ADDRESS`` names one),
    and write the shards. Returns one manifest per split written.

    Every input is read and every output folder made (on S3: its bucket found) before Ray starts, so a wrong
    path, column or bucket costs seconds; those refusals are ``ValueError`` naming the flag and what it allows.
    """
    import ray

    splits = _checked_splits(input_spec, output_url, endpoint_url=endpoint_url, image_column=image_column,
                             caption_column=caption_column, limit=limit)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(logging_level=noise.level_for("ray"))
    try:
        return [prepare_shards(records, url, options, endpoint_url=endpoint_url, workers=workers, extra=extra)
                for records, url, extra in splits]
    finally:
        if started_ray:
            ray.shutdown()


def _checked_splits(input_spec: str, output_url: str, *, endpoint_url: str | None, image_column: str,
                    caption_column: str, limit: int | None) -> list[tuple[list[SourceRecord], str, dict]]:
    """(records, output, manifest extras) per split, every input read and every output folder usable."""
    try:
        if input_spec == "fashion-mnist":
            splits = fashion_mnist_splits(output_url, limit=limit)
        elif input_spec.lower().endswith(TABLE_SUFFIXES):
            splits = [(table_records(input_spec, image_column=image_column, caption_column=caption_column,
                                     endpoint_url=endpoint_url)[:limit], output_url, {})]
        else:
            splits = [(_folder_records(input_spec)[:limit], output_url, {})]
    except (OSError, ValueError) as error:  # a missing or unreadable table, a column it lacks, the data set's files
        raise ValueError(f"--input {input_spec}: {_one_line(error)}") from None
    for records, url, _ in splits:
        if not records:
            raise ValueError(f"--input {input_spec}: nothing to write (a table needs rows, a folder images: "
                             f"{', '.join(FOLDER_IMAGE_SUFFIXES)})")
        try:
            storage.ensure_folder(storage.resolve(url, endpoint_url), create=True)
        except (OSError, ValueError, storage.StorageError) as error:  # a file in the way, no permission, no bucket
            raise ValueError(f"--output {output_url}: {_one_line(error)}") from None
    return splits


def _folder_records(input_spec: str) -> list[SourceRecord]:
    if not os.path.isdir(input_spec):
        what = ("a file that is no table" if os.path.isfile(input_spec) else
                "captioned folders must be local" if "://" in input_spec else "no such file or folder")
        raise ValueError(f"{what}; allowed: a captioned folder, a table ({', '.join(TABLE_SUFFIXES)}) or fashion-mnist")
    return captioned_folder_records(input_spec)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
