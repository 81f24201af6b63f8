"""Reading WebDataset tars as img2dataset writes them, as streams: members grouped into samples, damage kept local.

A sample is the run of tar members sharing a key (the name up to the first dot of the basename):
``KEY.jpg|jpeg|png|webp`` (image), ``KEY.txt`` (caption, or a field of ``KEY.json`` with ``caption_key``),
``KEY.json`` (metadata). A sample missing its image or caption, or with unreadable JSON, is dropped and
counted; a tar damaged part-way keeps every complete sample before the damage. Shards are read as
streams in blocks of samples, so memory does not grow with a shard's size (LAION shards are 0.3-1 GB).
Runs wherever shards are read (Ray Data read tasks, the index job, the held-out reader).
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from orchestrator import storage

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


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


def _caption_from(meta: dict, caption_key: str) -> str:
    value = meta
    for part in caption_key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return str(value).strip() if isinstance(value, (str, int, float)) else ""


def _sample_or_error(ordinal: int, key: str, members: dict[str, bytes], caption_key: str | None) -> RawSample | str:
    """The sample a key's members make, or the name of what is wrong with it (counted by the caller)."""
    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image is None:
        return "missing_image"
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "bad_json"
    meta = meta if isinstance(meta, dict) else {}
    if caption_key:
        caption = _caption_from(meta, caption_key)
    else:
        caption = members.get("txt", b"").decode("utf-8", errors="replace").strip()
    if not caption:
        return "missing_caption"
    return RawSample(ordinal, key, image, caption, meta)


SampleBuilder = Callable[[int, str, dict[str, bytes]], Any]
"""(ordinal, key, members by lower-case suffix) -> a sample, or the name of what is wrong with it."""


def iter_samples(stream, caption_key: str | None = None, *,
                 sample_from: SampleBuilder | None = None) -> Iterator[tuple[int, RawSample | str]]:
    """``(ordinal, sample or error name)`` per key of a WebDataset tar, read as a stream (one member in memory).

    Samples are training samples (image + caption, :class:`RawSample`) unless ``sample_from`` builds
    another kind (the evaluation sets' labelled or multi-caption samples).

    A key is the member name up to the first dot of its basename (WebDataset's rule: ``a/b.c.jpg`` is key
    ``a/b``, suffix ``c.jpg``); suffixes are matched lower-case, so ``.JPG`` and ``.jpeg`` are images.
    Raises ``tarfile.TarError`` / ``EOFError`` where the tar is damaged (the key being read then is lost)
    and ``OSError`` where the stream fails.
    """
    if sample_from is None:
        def sample_from(ordinal: int, key: str, members: dict[str, bytes]) -> RawSample | str:
            return _sample_or_error(ordinal, key, members, caption_key)
    ordinal, key, members = 0, None, {}
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            if not member.isfile():
                continue
            directory, _, base = member.name.rpartition("/")
            member_key, _, suffix = base.partition(".")
            member_key = f"{directory}/{member_key}" if directory else member_key
            if member_key != key and key is not None:
                yield ordinal, sample_from(ordinal, key, members)
                ordinal, members = ordinal + 1, {}
            key = member_key
            members[suffix.lower()] = archive.extractfile(member).read()
            archive.members = []  # stream mode keeps every header read (~1.4 KB a sample) unless dropped
    if key is not None:
        yield ordinal, sample_from(ordinal, key, members)


def parse_shard(data: bytes, caption_key: str | None = None) -> ShardParse:
    """A whole in-memory tar split into samples (small shards: the held-out split, tests, benchmarks).

    A tar damaged part-way keeps every complete sample before the damage and sets ``truncated``.
    """
    parse = ShardParse()
    try:
        for _, outcome in iter_samples(io.BytesIO(data), caption_key):
            if isinstance(outcome, str):
                parse.errors[outcome] += 1
            else:
                parse.samples.append(outcome)
    except (tarfile.TarError, EOFError, OSError):
        parse.truncated = True
    return parse


@dataclass
class ShardRead:
    """What reading one shard came to: samples passed on, bad samples by kind, and how the read ended."""

    yielded: int = 0
    errors: Counter = field(default_factory=Counter)
    truncated: bool = False
    skipped: bool = False
    failed_attempts: int = 0
    error: str | None = None

    def report(self, expected: int) -> dict:
        """The monitor's view: counts plus the samples lost against (or found beyond) the expected count."""
        bad = sum(self.errors.values())
        return {"yielded": self.yielded, "errors": dict(self.errors), "truncated": self.truncated,
                "skipped": self.skipped, "failed_attempts": self.failed_attempts, "error": self.error,
                "lost": max(0, expected - self.yielded - bad) if (self.truncated or self.skipped) else 0,
                "count_gap": self.yielded + bad - expected if not (self.truncated or self.skipped) else 0}


def stream_shard(location: storage.Location, read: ShardRead, *, block_samples: int, caption_key: str | None = None,
                 retries: int = 0, backoff_s: float = 0.0, sample_from: SampleBuilder | None = None) -> Iterator[list]:
    """A shard's good samples in blocks of ``block_samples``, streamed: memory is about one block.

    A failed read (``OSError``: network, missing object) is retried with exponential backoff from the
    shard's start, passing over the samples already given out, so nothing is yielded or counted twice;
    after ``retries`` the rest of the shard is skipped. A damaged tar (deterministic) is not retried: the
    complete samples before the damage are kept. Counts accumulate in ``read``.
    """
    committed = 0  # ordinals below this were given out (or counted bad) in an earlier block
    for attempt in range(retries + 1):
        block, pending = [], Counter()
        try:
            with location.fs.open_input_stream(location.path) as stream:
                for ordinal, outcome in iter_samples(stream, caption_key, sample_from=sample_from):
                    if ordinal < committed:
                        continue
                    if isinstance(outcome, str):
                        pending[outcome] += 1
                    else:
                        block.append(outcome)
                    if len(block) == block_samples:
                        _commit(read, block, pending)
                        committed = ordinal + 1
                        yield block
                        block, pending = [], Counter()
            _commit(read, block, pending)
            if block:
                yield block
            return
        except (tarfile.TarError, EOFError):
            read.truncated = True
            _commit(read, block, pending)
            if block:
                yield block
            return
        except (OSError, storage.StorageError) as exc:  # pyarrow raises OSError subclasses for S3 and disk errors
            read.failed_attempts += 1
            read.error = f"{type(exc).__name__}: {exc}"
            if attempt < retries:
                time.sleep(backoff_s * (2 ** attempt))
    read.skipped, read.truncated = read.yielded == 0, read.yielded > 0


def _commit(read: ShardRead, block: list[RawSample], pending: Counter) -> None:
    read.yielded += len(block)
    read.errors.update(pending)


def decode_image(encoded: bytes):
    """Decode JPEG/PNG/WebP bytes to a (3, H, W) uint8 tensor (torchvision's libjpeg-turbo path is ~1.7x
    faster than PIL + numpy here, and hands the transform a tensor without a copy); raises on bad data."""
    import torch
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as decode

    return decode(torch.frombuffer(bytearray(encoded), dtype=torch.uint8), mode=ImageReadMode.RGB)
