"""A shard set's table of contents (``manifest.json``): shard names and sample counts.

Epochs and learning-rate schedules need a length, so every shard set the stream reads has a manifest;
:func:`open_shard_set` checks a folder (local or S3) before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from orchestrator import storage
from orchestrator.logs import get_logger

logger = get_logger("data")

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "webdataset-img2dataset"


@dataclass(frozen=True)
class ShardEntry:
    name: str
    samples: int
    failed: int = 0


@dataclass
class Manifest:
    """The dataset's table of contents: shard names and sample counts (plus source-specific ``extra``)."""

    shards: list[ShardEntry]
    image_format: str = "jpg"
    max_side: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def total_samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def total_failed(self) -> int:
        return sum(shard.failed for shard in self.shards)


class ManifestError(ValueError):
    """The manifest is missing, unreadable or inconsistent; the message names the file and the field."""


def write_manifest(location: storage.Location, manifest: Manifest) -> None:
    body = {"format": MANIFEST_FORMAT, "version": 1, "total_samples": manifest.total_samples,
            "total_failed": manifest.total_failed, **asdict(manifest)}
    storage.write_bytes(location, json.dumps(body, indent=1).encode("utf-8"))


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """Validate a manifest's JSON; every problem is reported with the file and the offending field."""
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{where} is not valid JSON: {error}") from error
    if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{where}: field 'format' must be {MANIFEST_FORMAT!r}")
    shards = body.get("shards")
    if not isinstance(shards, list) or not shards:
        raise ManifestError(f"{where}: field 'shards' must be a non-empty list")
    entries = []
    for index, shard in enumerate(shards):
        name = shard.get("name") if isinstance(shard, dict) else None
        samples = shard.get("samples") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not name.endswith(".tar"):
            raise ManifestError(f"{where}: shards[{index}].name must be a '.tar' file name, got {name!r}")
        if not isinstance(samples, int) or samples < 0:
            raise ManifestError(f"{where}: shards[{index}].samples must be a count >= 0, got {samples!r}")
        entries.append(ShardEntry(name, samples, int(shard.get("failed", 0))))
    if len({entry.name for entry in entries}) != len(entries):
        raise ManifestError(f"{where}: field 'shards' lists a shard name twice")
    manifest = Manifest(entries, body.get("image_format", "jpg"), body.get("max_side"), body.get("extra", {}))
    if "total_samples" in body and body["total_samples"] != manifest.total_samples:
        raise ManifestError(f"{where}: total_samples={body['total_samples']} but the shards sum to "
                            f"{manifest.total_samples}")
    return manifest


def open_shard_set(url: str, endpoint_url: str | None = None) -> tuple[storage.Location, Manifest]:
    """Check a shard folder before any work: bucket, prefix, manifest and at least one listed shard exist."""
    folder = storage.resolve(url, endpoint_url)
    storage.ensure_folder(folder, create=False)
    present = storage.list_names(folder)
    if not present:
        raise storage.StorageError(f"{folder.url} holds no files (wrong prefix?)")
    if MANIFEST_NAME not in present:
        raise ManifestError(f"{folder.url} has no {MANIFEST_NAME}; write shards with jobs/prepare_data.py")
    manifest = parse_manifest(storage.read_bytes(folder.child(MANIFEST_NAME)), folder.child(MANIFEST_NAME).url)
    listed = [shard.name for shard in manifest.shards]
    missing = [name for name in listed if name not in present]
    if len(missing) == len(listed):
        raise ManifestError(f"no shard listed in {folder.url}/{MANIFEST_NAME} exists there "
                            f"(first listed: {listed[0]}; files found: {sorted(present)[:5]})")
    if missing:
        logger.warning("%d shard(s) of %s are missing and will be skipped: %s", len(missing), folder.url, missing[:10])
    return folder, manifest
