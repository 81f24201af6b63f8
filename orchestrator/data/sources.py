"""Inputs for shard writing: captioned folders, table files and Fashion-MNIST, as :class:`SourceRecord` lists.

An input without a caption stays a record (with ``caption=None``), so the writer counts it as a failure
rather than skipping it silently.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import storage


@dataclass(frozen=True)
class SourceRecord:
    """One input sample: an image (local path, ``s3://`` URL or uint8 array), its caption and extra metadata.

    ``source`` names the input in reports (path, URL or ``fashion-mnist/train/123``); ``caption`` is None
    when the source had none, which makes the record a counted failure rather than a silent skip.
    """

    image: str | np.ndarray
    caption: str | None
    source: str
    meta: dict = field(default_factory=dict)


FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def captioned_folder_records(root: str) -> list[SourceRecord]:
    """Every image under ``root`` with the first line of ``NAME.txt`` beside it as caption (Tux Paint's layout)."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"captioned folder {root} does not exist")
    records = []
    for image_path in sorted(p for p in base.rglob("*") if p.suffix.lower() in FOLDER_IMAGE_SUFFIXES):
        caption_path = image_path.with_suffix(".txt")
        caption = None
        if caption_path.is_file():
            lines = caption_path.read_text(encoding="utf-8", errors="replace").splitlines()
            caption = lines[0].strip() if lines and lines[0].strip() else None
        records.append(SourceRecord(str(image_path), caption, str(image_path.relative_to(base))))
    return records


def _read_table(raw: bytes, suffix: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    if suffix == ".csv":
        return pacsv.read_csv(pa.BufferReader(raw))
    if suffix in (".jsonl", ".json", ".ndjson"):
        return pajson.read_json(pa.BufferReader(raw))
    if suffix == ".parquet":
        return pq.read_table(pa.BufferReader(raw))
    raise ValueError(f"table file must end in .csv, .jsonl or .parquet, got {suffix!r}")


def table_records(table_url: str, *, image_column: str = "image", caption_column: str = "caption",
                  endpoint_url: str | None = None) -> list[SourceRecord]:
    """Rows of a CSV / JSONL / Parquet table naming an image (relative paths are relative to the table)."""
    location = storage.resolve(table_url, endpoint_url)
    table = _read_table(storage.read_bytes(location), Path(location.path).suffix.lower())
    for role, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column not in table.column_names:
            raise ValueError(f"{role}={column!r} is not a column of {table_url}; columns: {table.column_names}")
    folder = location.url.rsplit("/", 1)[0]
    records = []
    for row_number, row in enumerate(table.to_pylist()):
        image = str(row[image_column])
        if not image.startswith("s3://") and not image.startswith("/"):
            image = f"{folder}/{image}"
        caption = row[caption_column]
        meta = {k: v for k, v in row.items() if k not in (image_column, caption_column)}
        records.append(SourceRecord(image, str(caption) if caption else None, f"{table_url}#{row_number}", meta))
    return records


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")


FASHION_MNIST_TEMPLATES = ("a picture of a {}.", "an image of a {}.", "a photo of the {}.",
                           "a black and white photo of a {}.", "a low resolution photo of a {}.",
                           "a small photo of a {}.", "a {}.")
FASHION_MNIST_HELDOUT_TEMPLATE = "a photo of a {}."


def read_idx(path: str) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST family's format): big-endian dims then uint8 values."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    magic, = struct.unpack(">I", raw[:4])
    if magic >> 8 != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_records(split: str, *, root: str = FASHION_MNIST_DIR,
                          templates: Sequence[str] = FASHION_MNIST_TEMPLATES, seed: int = 0) -> list[SourceRecord]:
    """Fashion-MNIST ``train`` or ``test`` images captioned by a template (picked per image from ``seed``)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not templates or any("{}" not in template for template in templates):
        raise ValueError(f"templates must be non-empty and each contain '{{}}', got {list(templates)}")
    images = read_idx(f"{root}/{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(f"{root}/{prefix}-labels-idx1-ubyte.gz")
    choice = np.random.default_rng(seed).integers(0, len(templates), size=len(labels))
    return [
        SourceRecord(images[i], templates[choice[i]].format(FASHION_MNIST_CLASSES[labels[i]]),
                     f"fashion-mnist/{split}/{i}", {"label": int(labels[i])})
        for i in range(len(labels))
    ]


TABLE_SUFFIXES = (".csv", ".jsonl", ".json", ".ndjson", ".parquet")
