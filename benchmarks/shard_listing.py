"""Seconds to resolve a 5,000-shard S3 source (listing + sample counts) against a bare boto3 listing.

    python benchmarks/shard_listing.py [--shards 5000] [--rounds 3] [--json benchmarks/results/shard_listing.jsonl]

Starts moto's S3 server on 127.0.0.1 (fake credentials; stopped by its PID at the end) and uploads, under
one prefix, ``--shards`` tiny ``NNNNN.tar`` objects (never read) and img2dataset's ``NNNNN_stats.json``
(``successes``, a different count per shard). Then times ``resolve_source`` for:

* ``prefix, stats``: ``s3://bucket/laion`` (one paged listing + one stats read per shard);
* ``brace, stats``: ``s3://bucket/laion/{00000..04999}.tar`` (the same listing, names checked against it);
* ``prefix, manifest`` / ``brace, manifest``: the same after a ``manifest.json`` is written beside them;
* ``prefix, sizes.json``: a second prefix holding the tars and one ``sizes.json``.

Baseline: a raw boto3 ``list_objects_v2`` paginator over the prefix, the floor any lister pays; beside it,
boto3 ``get_object`` of every stats file on as many threads as the resolver uses (the floor of reading
them). Each case runs ``--rounds`` times (median); every case must find every shard with its right count,
and the listing must page (> 1,000 keys). moto's request log gives the requests per stats file. moto on a
small machine serves ~100-200 requests/s, far below S3: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from harness.local_servers import moto_server as local_moto_server

FAKE_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
BUCKET = "bench"
UPLOADERS = 16
BASELINE = "boto3 list_objects_v2 (baseline)"
STATS_READ = '"{method} /bench/laion/'  # moto's access log line of a request under the stats prefix


def expected_count(index: int) -> int:
    return 9_000 + (index * 37) % 1_000  # distinct per shard, so a count read from the wrong file shows


def upload(client, keys_and_bodies: list[tuple[str, bytes]]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(UPLOADERS) as pool:
        list(pool.map(lambda item: client.put_object(Bucket=BUCKET, Key=item[0], Body=item[1]), keys_and_bodies))
    return time.perf_counter() - started


def boto3_listing(client, prefix: str) -> int:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
    return sum(len(page.get("Contents", [])) for page in pages)


def boto3_stats_reads(client, names: list[str], threads: int) -> int:
    def successes(name: str) -> int:
        return json.loads(client.get_object(Bucket=BUCKET, Key=f"laion/{name}_stats.json")["Body"].read())["successes"]

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(successes, names))


def stats_requests(log_path: str, start: int) -> dict[str, int]:
    """Requests for ``*_stats.json`` objects in moto's log after byte ``start``, by HTTP method."""
    with open(log_path, "rb") as handle:
        handle.seek(start)
        lines = [line for line in handle.read().decode(errors="replace").splitlines() if "_stats.json" in line]
    return {method: sum(STATS_READ.format(method=method) in line for line in lines) for method in ("HEAD", "GET")}


def check(resolved, shards: int) -> None:
    """Every shard found once, in order, with the count its stats file holds."""
    if len(resolved.shards) != shards:
        raise SystemExit(f"{resolved.name}: found {len(resolved.shards)} shards, uploaded {shards}")
    for index, shard in enumerate(resolved.shards):
        if shard.name != f"{index:05d}.tar" or shard.samples != expected_count(index):
            raise SystemExit(f"{resolved.name}: shard {index} is {shard.name} with {shard.samples} samples, "
                             f"expected {index:05d}.tar with {expected_count(index)}")


def median_seconds(run, rounds: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(rounds):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2], result


@contextlib.contextmanager
def moto_server(scratch: str) -> Iterator[tuple[str, str]]:
    """(endpoint URL, access log path) of a moto S3 server on 127.0.0.1, stopped by its PID on exit."""
    log_path = os.path.join(scratch, "moto.log")
    with local_moto_server(log_path, env={**os.environ, **FAKE_AWS_ENV}) as url:
        yield url, log_path


def shard_set_objects(names: list[str]) -> list[tuple[str, bytes]]:
    """``laion/``: tars + img2dataset stats; ``sized/``: tars + one sizes.json."""
    objects = [(f"laion/{name}.tar", b"tar") for name in names]
    objects += [(f"laion/{name}_stats.json", json.dumps({"successes": expected_count(index)}).encode())
                for index, name in enumerate(names)]
    objects += [(f"sized/{name}.tar", b"tar") for name in names]
    objects.append(("sized/sizes.json", json.dumps({f"{name}.tar": expected_count(index)
                                                     for index, name in enumerate(names)}).encode()))
    return objects


def time_cases(client, endpoint: str, log_path: str, names: list[str], rounds: int) -> tuple[dict, dict, dict]:
    """Seconds per case, where each resolved source's counts came from, and requests per stats file."""
    from orchestrator import storage
    from orchestrator.config import DataSource
    from orchestrator.data import Manifest, ShardEntry, resolve_source, write_manifest
    from orchestrator.data.shardsets import COUNT_READERS

    def resolve(spec: str):
        resolved = resolve_source(DataSource(shards=spec), endpoint)
        check(resolved, len(names))
        return resolved

    prefix, brace = f"s3://{BUCKET}/laion", f"s3://{BUCKET}/laion/{{{names[0]}..{names[-1]}}}.tar"
    timings, origins, requests = {}, {}, {}
    timings[BASELINE], keys = median_seconds(lambda: boto3_listing(client, "laion"), rounds)
    if keys != 2 * len(names) or keys <= 1000:
        raise SystemExit(f"boto3 listed {keys} keys, expected {2 * len(names)} (> 1000: paged)")
    label = f"boto3 get_object x{len(names)} stats (x{COUNT_READERS} threads)"
    timings[label], total = median_seconds(lambda: boto3_stats_reads(client, names, COUNT_READERS), rounds)
    if total != sum(map(expected_count, range(len(names)))):
        raise SystemExit(f"boto3 read {total} successes in all, expected another sum")
    for label, spec in (("prefix, stats", prefix), ("brace, stats", brace)):
        start = os.path.getsize(log_path)
        timings[label], resolved = median_seconds(lambda spec=spec: resolve(spec), rounds)
        origins[label], requests[label] = resolved.counted_from, stats_requests(log_path, start)
    write_manifest(storage.resolve(f"{prefix}/manifest.json", endpoint),
                   Manifest([ShardEntry(f"{name}.tar", expected_count(index)) for index, name in enumerate(names)]))
    for label, spec in (("prefix, manifest", prefix), ("brace, manifest", brace),
                        ("prefix, sizes.json", f"s3://{BUCKET}/sized")):
        timings[label], resolved = median_seconds(lambda spec=spec: resolve(spec), rounds)
        origins[label] = resolved.counted_from
    return timings, origins, requests


def report(timings: dict, origins: dict, requests: dict, shards: int, rounds: int) -> None:
    base = timings[BASELINE]
    print(f"{shards} shards ({2 * shards} keys under the prefix), median of {rounds}:")
    for label, seconds in timings.items():
        counted = f"  counts from {origins[label]}" if label in origins else ""
        if label in requests:
            per_shard = {method: count / (shards * rounds) for method, count in requests[label].items()}
            counted += "; per stats file: " + ", ".join(f"{n:.1f} {method}" for method, n in per_shard.items())
        print(f"{label:44s} {seconds:7.2f} s {seconds / base:6.1f}x baseline {seconds / shards * 1e3:6.2f} ms/shard"
              f"{counted}")
    stats_s = timings["prefix, stats"] - timings["prefix, manifest"]
    floor = next(seconds for label, seconds in timings.items() if label.startswith("boto3 get_object"))
    print(f"reading the stats files: {stats_s:.1f} s more than the manifest, {stats_s / shards * 1e3:.2f} ms per "
          f"shard ({shards / max(stats_s, 1e-9):.0f} shards/s; {stats_s / floor:.2f}x boto3's get_object floor); "
          f"all {shards} shards found with their counts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=1, help="runs per case (median); moto makes each slow")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "shard_listing.jsonl"))
    args = parser.parse_args()
    os.environ.update(FAKE_AWS_ENV)
    import boto3

    names = [f"{index:05d}" for index in range(args.shards)]
    with tempfile.TemporaryDirectory() as scratch, moto_server(scratch) as (endpoint, log_path):
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        objects = shard_set_objects(names)
        upload_s = upload(client, objects)
        print(f"uploaded {len(objects)} objects in {upload_s:.1f} s ({len(objects) / upload_s:.0f}/s, {UPLOADERS} threads)")
        timings, origins, requests = time_cases(client, endpoint, log_path, names, args.rounds)
    report(timings, origins, requests, args.shards, args.rounds)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as handle:
            handle.write(json.dumps({"benchmark": "shard_listing", "shards": args.shards, "rounds": args.rounds,
                                     "cpus": os.cpu_count(), "server": "moto", "upload_s": round(upload_s, 1),
                                     "stats_requests": requests, "seconds": {k: round(v, 3) for k, v in timings.items()},
                                     "ratio_to_baseline": {k: round(v / timings[BASELINE], 2)
                                                           for k, v in timings.items()}}) + "\n")


if __name__ == "__main__":
    main()
