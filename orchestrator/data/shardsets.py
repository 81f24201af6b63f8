"""Shard sets as people have them: folders, ``s3://`` prefixes, brace patterns and lists of ``.tar`` files.

A source's shards are found by listing each folder once (S3 listings page, whatever the count) and
their sample counts come from the first of, per shard:

1. a ``manifest.json`` (rayclip's, beside the shards or at ``manifest``; ``prepare_data.py --index`` writes one);
2. img2dataset's ``NNNNN_stats.json`` (``successes``), read in parallel;
3. img2dataset's ``NNNNN.parquet`` (rows with ``status == "success"``);
4. a ``sizes.json`` beside the shards (open_clip's and webdataset's convention: ``{"NNNNN.tar": count}``).

A shard with none of them is an error that names the command which counts them. Runs on the driver
(``check_inputs``) and in Ray Train's controller (the stream's plan).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import storage
from orchestrator.config import DataConfig, DataSource
from orchestrator.data.manifest import MANIFEST_NAME, ManifestError, parse_manifest
from orchestrator.logs import get_logger

logger = get_logger("data")

SIZES_NAME = "sizes.json"
COUNT_READERS = 32  # stats / parquet files read at once (small objects: latency-bound)


@dataclass(frozen=True)
class ShardRef:
    """One shard of a source: where it is, its name in positions and logs, and its sample count."""

    url: str
    name: str  # unique in the source: the path below the source's common folder
    samples: int


@dataclass(frozen=True)
class SourceShards:
    """A source resolved: its shards with counts, its weight, and where the counts came from."""

    name: str
    weight: float
    shards: tuple[ShardRef, ...]
    counted_from: dict[str, int]  # "manifest.json" / "img2dataset stats" / ... -> shards counted so

    @property
    def total_samples(self) -> int:
        return sum(shard.samples for shard in self.shards)


def expand_spec(spec: str | list[str]) -> list[str]:
    """Brace patterns expanded (``{00000..00099}`` keeps its zero padding), in the order given."""
    from braceexpand import braceexpand

    items = spec if isinstance(spec, list) else [spec]
    return [url for item in items for url in braceexpand(item.strip())]


def split_url(url: str) -> tuple[str, str]:
    folder, _, name = url.rstrip("/").rpartition("/")
    return folder, name


def find_shards(spec: str | list[str], endpoint_url: str | None, *, use_manifest: bool = True) -> tuple[list[str], dict[str, set[str]]]:
    """The ``.tar`` URLs a spec names that exist, and each folder's file names (one listing per folder).

    A folder with a ``manifest.json`` is the shards it lists (unless ``use_manifest`` is false, as when
    indexing); otherwise every ``.tar`` in it, in name order.
    """
    listings: dict[str, set[str]] = {}

    def names_in(folder: str) -> set[str]:
        if folder not in listings:
            location = storage.resolve(folder, endpoint_url)
            storage.ensure_folder(location, create=False)
            listings[folder] = storage.list_names(location)
        return listings[folder]

    urls, absent = [], []
    for item in expand_spec(spec):
        if item.endswith(".tar"):
            folder, name = split_url(storage.resolve(item, endpoint_url).url)
            (urls if name in names_in(folder) else absent).append(f"{folder}/{name}")
            continue
        folder = storage.resolve(item, endpoint_url).url
        present = names_in(folder)
        if not present:
            raise storage.StorageError(f"{folder} holds no files (wrong prefix?)")
        if use_manifest and MANIFEST_NAME in present:  # a manifest is the folder's table of contents: a listed shard that is
            urls += _listed_shards(folder, present, endpoint_url)  # gone is lost data, skipped and counted
            continue
        tars = sorted(name for name in present if name.endswith(".tar"))
        if not tars:
            raise storage.StorageError(f"{folder} holds no .tar shards (files found: {sorted(present)[:5]})")
        urls += [f"{folder}/{name}" for name in tars]
    if absent and not urls:
        raise storage.StorageError(f"none of the {len(absent)} shards named exists (first: {absent[0]})")
    if absent:  # img2dataset leaves gaps where a whole shard failed to download
        logger.warning("%d of %d named shards do not exist and are left out: %s", len(absent),
                       len(absent) + len(urls), [split_url(url)[1] for url in absent[:10]])
    if len(set(urls)) != len(urls):
        raise ManifestError(f"the shard list names a shard twice: {sorted({u for u in urls if urls.count(u) > 1})[:5]}")
    return urls, listings


def _listed_shards(folder: str, present: set[str], endpoint_url: str | None) -> list[str]:
    listed = list(_manifest_counts(f"{folder}/{MANIFEST_NAME}", endpoint_url))
    names = [split_url(url)[1] for url in listed]
    missing = [name for name in names if name not in present]
    if len(missing) == len(names):
        raise ManifestError(f"no shard listed in {folder}/{MANIFEST_NAME} exists there "
                            f"(first listed: {names[0]}; files found: {sorted(present)[:5]})")
    if missing:
        logger.warning("%d shard(s) of %s are missing and will be skipped: %s", len(missing), folder, missing[:10])
    unlisted = sorted(name for name in present if name.endswith(".tar") and name not in names)
    if unlisted:
        logger.warning("%d .tar file(s) in %s are not in its %s and are left out (re-run prepare_data.py --index): %s",
                       len(unlisted), folder, MANIFEST_NAME, unlisted[:5])
    return listed


def _manifest_counts(url: str, endpoint_url: str | None) -> dict[str, int]:
    """A manifest's counts by shard URL (a manifest beside the shards names them relative to its folder)."""
    location = storage.resolve(url, endpoint_url)
    manifest = parse_manifest(storage.read_bytes(location), location.url)
    folder = split_url(location.url)[0]
    return {(entry.name if "/" in entry.name else f"{folder}/{entry.name}"): entry.samples
            for entry in manifest.shards}


def _stats_successes(raw: bytes) -> int:
    return int(json.loads(raw)["successes"])


def _parquet_successes(raw: bytes) -> int:
    status = pq.read_table(pa.BufferReader(raw), columns=["status"]).column("status")
    return sum(1 for value in status.to_pylist() if value == "success")


def _read_counts(jobs: dict[str, tuple[str, callable]], endpoint_url: str | None) -> dict[str, int]:
    """Shard URL -> count, reading each job's file (URL, parser) in parallel; a bad file is named."""

    def read(item):
        shard, (file_url, parser) = item
        try:
            return shard, parser(storage.read_bytes(storage.resolve(file_url, endpoint_url)))
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as error:
            raise ManifestError(f"cannot read the sample count of {shard} from {file_url}: {error}") from error

    with ThreadPoolExecutor(COUNT_READERS) as pool:
        return dict(pool.map(read, jobs.items()))


def _stem(name: str) -> str:
    return name[: -len(".tar")]


def count_shards(urls: list[str], listings: dict[str, set[str]], endpoint_url: str | None,
                 manifest_url: str | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """Sample counts by shard URL, each from the first source that has it; and shards counted per source."""
    counts: dict[str, int] = {}
    origin: dict[str, int] = defaultdict(int)
    manifests = [manifest_url] if manifest_url else []
    manifests += [f"{folder}/{MANIFEST_NAME}" for folder, names in listings.items() if MANIFEST_NAME in names]
    for url in manifests:
        for shard, samples in _manifest_counts(url, endpoint_url).items():
            counts.setdefault(shard, samples)
    wanted = [url for url in urls if url not in counts]
    origin[MANIFEST_NAME] = len(urls) - len(wanted)
    for label, suffix, parser in (("img2dataset stats", "_stats.json", _stats_successes),
                                  ("img2dataset parquet", ".parquet", _parquet_successes)):
        jobs = {}
        for url in wanted:
            folder, name = split_url(url)
            if _stem(name) + suffix in listings.get(folder, ()):
                jobs[url] = (f"{folder}/{_stem(name)}{suffix}", parser)
        counts.update(_read_counts(jobs, endpoint_url))
        origin[label] = len(jobs)
        wanted = [url for url in wanted if url not in counts]
    for folder in sorted({split_url(url)[0] for url in wanted}):
        if SIZES_NAME in listings.get(folder, ()):
            sizes = json.loads(storage.read_bytes(storage.resolve(f"{folder}/{SIZES_NAME}", endpoint_url)))
            found = {url: int(sizes[split_url(url)[1]]) for url in wanted
                     if split_url(url)[0] == folder and split_url(url)[1] in sizes}
            counts.update(found)
            origin[SIZES_NAME] += len(found)
    return counts, {label: n for label, n in origin.items() if n}


def _names(urls: list[str]) -> dict[str, str]:
    """Each shard's name: its path below the folders' common prefix (the file name for a single folder)."""
    folders = {split_url(url)[0] for url in urls}
    if len(folders) == 1:
        return {url: split_url(url)[1] for url in urls}
    parts = [folder.split("/") for folder in folders]
    common = 0
    while all(len(p) > common and p[common] == parts[0][common] for p in parts):
        common += 1
    prefix = "/".join(parts[0][:common])
    return {url: url[len(prefix) + 1:] for url in urls}


def resolve_source(source: DataSource, endpoint_url: str | None) -> SourceShards:
    """A source's existing shards with their counts, checked before any work starts."""
    started = time.monotonic()
    urls, listings = find_shards(source.shards, endpoint_url)
    counts, origin = count_shards(urls, listings, endpoint_url, source.manifest)
    uncounted = [url for url in urls if url not in counts]
    if uncounted:
        spec = source.shards if isinstance(source.shards, str) else " ".join(source.shards)
        raise ManifestError(
            f"{len(uncounted)} of {len(urls)} shards of {source.display_name!r} have no sample count (no "
            f"manifest.json, img2dataset NNNNN_stats.json / NNNNN.parquet or sizes.json; first: {uncounted[0]}); "
            f"count them once with: python jobs/prepare_data.py --index '{spec}'")
    names = _names(urls)
    shards = tuple(ShardRef(url, names[url], counts[url]) for url in urls)
    resolved = SourceShards(source.display_name, source.weight, shards, origin)
    logger.info("source %s: %d shards, %d samples (counts from %s; %.1f s)", resolved.name, len(shards),
                resolved.total_samples, ", ".join(f"{label}: {n}" for label, n in origin.items()),
                time.monotonic() - started)
    return resolved


def resolve_sources(cfg: DataConfig) -> list[SourceShards]:
    """Every source of the ``data`` section, resolved (see :func:`resolve_source`)."""
    return [resolve_source(source, cfg.s3_endpoint_url) for source in cfg.source_list()]
