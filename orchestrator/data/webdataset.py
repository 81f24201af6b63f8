"""Reading WebDataset tars as img2dataset writes them, as streams: members grouped into samples, damage kept local.

A sample is the run of tar members sharing a key (the name up to the first dot of the basename):
``KEY.jpg|jpeg|png|webp`` (image), ``KEY.txt`` (caption, or a field of ``KEY.json`` with ``caption_key``),
``KEY.json`` (metadata). A sample missing its image or caption, or with unreadable JSON, is dropped and
counted. A tar cut short (a partial upload, a bad copy) keeps every complete sample before the cut; a
file that is no tar at all is unreadable. Shards are read as streams in blocks of samples, so memory does
not grow with a shard's size (LAION shards are 0.3-1 GB).
Runs wherever shards are read (Ray Data read tasks, the index job, the held-out reader).
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from orchestrator import storage

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# tarfile's stream mode reads its source in records; where it stopped lies within the last record and a header
KEPT_TAIL_BYTES = tarfile.RECORDSIZE + tarfile.BLOCKSIZE


class NotATarArchive(tarfile.ReadError):
    """The file is no tar archive (random bytes, an empty file): nothing in it can be read, retrying is futile."""


class TarCutShort(tarfile.ReadError):
    """The tar breaks off before its end-of-archive marker: the samples before the break are good, the rest lost."""


class _TailKeepingStream:
    """A read-only stream that keeps (by reference) its last ``KEPT_TAIL_BYTES`` read, so that the block where
    tarfile stopped can be looked at: tarfile's stream mode ends quietly at an empty, partial or invalid header
    anywhere but at the start, so a tar cut at a member boundary would pass for a shorter one."""

    def __init__(self, stream):
        self.stream, self.position, self.kept = stream, 0, 0
        self.chunks: deque[bytes] = deque()  # the latest reads, the oldest starting at position - kept

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.chunks.append(data)
        self.position += len(data)
        self.kept += len(data)
        while self.kept - len(self.chunks[0]) >= KEPT_TAIL_BYTES:
            self.kept -= len(self.chunks.popleft())
        return data

    def block_at(self, offset: int) -> bytes:
        """The tar block at ``offset`` (shorter, or empty, where the file ends within it)."""
        start = offset - (self.position - self.kept)
        return b"".join(self.chunks)[start: start + tarfile.BLOCKSIZE]


def _end_problem(stream: _TailKeepingStream, offset: int) -> str | None:
    """None where the tar ends with its end-of-archive marker (a whole zero block at ``offset``), else how it ends."""
    block = stream.block_at(offset)
    if len(block) == tarfile.BLOCKSIZE and not block.strip(tarfile.NUL):
        return None
    if not block:
        return f"cut short at byte {offset}: the file ends after a member, with no end-of-archive marker"
    if len(block) < tarfile.BLOCKSIZE:
        return f"cut short at byte {offset}: the file ends inside a header"
    return f"cut short at byte {offset}: an invalid header where a member or the end-of-archive marker should begin"


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
    unreadable: bool = False
    problem: str | None = None


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
    Raises :class:`NotATarArchive` where the file does not start with a tar header, :class:`TarCutShort`
    where the tar breaks off before its end-of-archive marker (the key being read then is still yielded if its
    complete members make a sample, never as an error: what is missing was lost to the cut), other
    ``tarfile.TarError`` / ``EOFError`` where it is otherwise damaged, and ``OSError`` where the stream fails.
    """
    if sample_from is None:
        def sample_from(ordinal: int, key: str, members: dict[str, bytes]) -> RawSample | str:
            return _sample_or_error(ordinal, key, members, caption_key)
    source = _TailKeepingStream(stream)
    try:
        archive = tarfile.open(fileobj=source, mode="r|")
    except tarfile.ReadError as exc:  # the first header is unreadable: tarfile raises only at the start
        raise NotATarArchive(f"not a tar archive: {exc}") from None
    ordinal, key, members, problem = 0, None, {}, None
    with archive:
        try:
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
            problem = _end_problem(source, archive.offset)
        except tarfile.ReadError as exc:
            problem = f"cut short at byte {source.position}, in {member.name}: {exc}"
    if members:
        last = sample_from(ordinal, key, members)
        if problem is None or not isinstance(last, str):  # at a cut, what the last key lacks was lost, not bad
            yield ordinal, last
    if problem is not None:
        raise TarCutShort(problem)


def parse_shard(data: bytes, caption_key: str | None = None) -> ShardParse:
    """A whole in-memory tar split into samples (small shards: the held-out split, tests, benchmarks).

    A tar cut short or damaged part-way keeps every complete sample before the damage and sets
    ``truncated``; a file that is no tar sets ``unreadable``; ``problem`` says what is wrong.
    """
    parse = ShardParse()
    try:
        for _, outcome in iter_samples(io.BytesIO(data), caption_key):
            if isinstance(outcome, str):
                parse.errors[outcome] += 1
            else:
                parse.samples.append(outcome)
    except NotATarArchive as exc:
        parse.unreadable, parse.problem = True, str(exc)
    except (tarfile.TarError, EOFError, OSError) as exc:
        parse.truncated, parse.problem = True, str(exc) or type(exc).__name__
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
    after ``retries`` the rest of the shard is skipped. A file that is no tar is skipped at once, and a tar cut
    short or damaged part-way keeps the complete samples before the damage (both deterministic: not
    retried); ``read.error`` says which. Counts accumulate in ``read``.
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
        except NotATarArchive as exc:
            read.skipped, read.failed_attempts, read.error = True, read.failed_attempts + 1, str(exc)
            return
        except (tarfile.TarError, EOFError) as exc:
            read.truncated, read.error = True, str(exc) or type(exc).__name__
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
