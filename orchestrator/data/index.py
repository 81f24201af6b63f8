"""``prepare_data.py --index``: count the samples of shards that have no counts, and write a manifest.

Every shard is counted by a Ray task that streams it (memory is one block of samples, whatever the
shard's size) and applies the stream's own rules (a sample needs an image and a caption; bad JSON and
damage are counted), so the manifest's counts are what training will read. The manifest goes beside
the shards (one per folder, shard names relative to it) or, when the bucket is read-only, to ``output``
(one file naming every shard by URL; point ``data.manifest`` at it).
"""

from __future__ import annotations

import time

from orchestrator import storage
from orchestrator.data.manifest import MANIFEST_NAME, Manifest, ShardEntry, write_manifest
from orchestrator.data.shardsets import find_shards, split_url
from orchestrator.data.webdataset import ShardRead, stream_shard
from orchestrator import noise
from orchestrator.logs import get_logger

logger = get_logger("data")

INDEX_BLOCK_SAMPLES = 1024


def count_shard(url: str, endpoint_url: str | None, caption_key: str | None, retries: int) -> dict:
    """One shard's good samples and bad ones, by streaming it (a Ray task in :func:`index_shards`)."""
    read = ShardRead()
    for _ in stream_shard(storage.resolve(url, endpoint_url), read, block_samples=INDEX_BLOCK_SAMPLES,
                          caption_key=caption_key, retries=retries, backoff_s=0.5):
        pass
    return {"url": url, "samples": read.yielded, "failed": sum(read.errors.values()),
            "problem": read.error if read.skipped or read.truncated else None}


def _manifest_location(output: str | None, folder: str, endpoint_url: str | None) -> storage.Location:
    if output is None:
        return storage.resolve(f"{folder}/{MANIFEST_NAME}", endpoint_url)
    return storage.resolve(output if output.endswith(".json") else f"{output.rstrip('/')}/{MANIFEST_NAME}",
                           endpoint_url)


def index_shards(spec: str | list[str], *, output: str | None = None, endpoint_url: str | None = None,
                 caption_key: str | None = None, workers: int = 4, retries: int = 3) -> dict[str, Manifest]:
    """Count every shard of ``spec`` in parallel on Ray and write the manifest(s); returns them by location.

    Joins the running Ray (or starts a local one for the call). A shard that cannot be read (no tar, or
    nothing readable before the damage) is left out of the manifest and named in the log (it would otherwise
    be planned with a count of zero); a tar cut short part-way is counted up to the cut and named in the log.
    """
    import ray

    urls, _ = find_shards(spec, endpoint_url, use_manifest=False)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(logging_level=noise.level_for("ray"))
    try:
        results = _count_all(urls, endpoint_url, caption_key, workers, retries)
    finally:
        if started_ray:
            ray.shutdown()
    return _write_manifests(spec, urls, results, output, endpoint_url, caption_key)


def _count_all(urls: list[str], endpoint_url: str | None, caption_key: str | None, workers: int,
               retries: int) -> list[dict]:
    import ray

    remote_count = ray.remote(num_cpus=1, max_retries=2)(count_shard)
    pending, results, started, queued = {}, [], time.monotonic(), list(urls)
    while queued or pending:
        while queued and len(pending) < workers:
            url = queued.pop(0)
            pending[remote_count.remote(url, endpoint_url, caption_key, retries)] = url
        ready, _ = ray.wait(list(pending), num_returns=1)
        pending.pop(ready[0])
        results.append(ray.get(ready[0]))
        elapsed = time.monotonic() - started
        if len(results) % max(1, len(urls) // 20) == 0 or len(results) == len(urls):
            logger.info("indexed %d/%d shards, %d samples, %.0f s elapsed, ETA %.0f s", len(results), len(urls),
                        sum(r["samples"] for r in results), elapsed, elapsed / len(results) * (len(urls) - len(results)))
    return results


def _write_manifests(spec, urls: list[str], results: list[dict], output: str | None, endpoint_url: str | None,
                     caption_key: str | None) -> dict[str, Manifest]:
    unreadable = [r for r in results if r["problem"] and r["samples"] == 0]
    for result in unreadable:
        logger.warning("left out of the manifest: %s (%s)", result["url"], result["problem"])
    for result in results:
        if result["problem"] and result["samples"]:
            logger.warning("damaged: %s (%s); the manifest counts the %d samples before the damage", result["url"],
                           result["problem"], result["samples"])
    by_url = {r["url"]: r for r in results if r not in unreadable}
    groups: dict[str, list[ShardEntry]] = {}
    for url in urls:  # listing order, so the manifest reads like the folder
        if url in by_url:
            folder, name = split_url(url)
            location = _manifest_location(output, folder, endpoint_url)
            groups.setdefault(location.url, []).append(
                ShardEntry(name if output is None else url, by_url[url]["samples"], by_url[url]["failed"]))
    manifests = {}
    for location_url, entries in groups.items():
        manifest = Manifest(entries, extra={"indexed_from": spec, "caption_key": caption_key})
        write_manifest(storage.resolve(location_url, endpoint_url), manifest)
        manifests[location_url] = manifest
    return manifests
