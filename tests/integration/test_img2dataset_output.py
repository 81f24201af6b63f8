"""The img2dataset fixture holds what rayclip consumes from a real img2dataset run: per-shard counts that agree
across ``_stats.json``, the tar and the parquet, complete samples (jpg + txt + json under one key), and the
planted broken URLs recorded as failures rather than samples.
"""

from __future__ import annotations

import json
import tarfile
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.img2dataset_output import img2dataset_successes

pytestmark = pytest.mark.integration


def _members_by_key(tar_path: Path) -> dict[str, dict[str, bytes]]:
    """KEY -> {extension: payload} for every member of one tar."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(tar_path) as archive:
        for member in archive.getmembers():
            key, _, extension = member.name.partition(".")
            samples[key][extension] = archive.extractfile(member).read()
    return samples


def test_img2dataset_output_counts_and_samples_agree(img2dataset_shards: Path):
    successes = img2dataset_successes(img2dataset_shards)
    assert len(successes) >= 3
    assert sorted(successes) == sorted(path.name for path in img2dataset_shards.glob("*.tar"))
    failed_urls = []
    for tar_name, count in successes.items():
        samples = _members_by_key(img2dataset_shards / tar_name)
        assert sum("jpg" in members for members in samples.values()) == count, tar_name
        for key, members in samples.items():
            assert set(members) == {"jpg", "txt", "json"}, f"{tar_name} {key}: {sorted(members)}"
            meta = json.loads(members["json"])
            assert meta["key"] == key and meta["status"] == "success"
            assert meta["caption"] == members["txt"].decode() != ""
        rows = pq.read_table(img2dataset_shards / tar_name.replace(".tar", ".parquet")).to_pylist()
        assert sum(row["status"] == "success" for row in rows) == count, tar_name
        failed_urls += [row["url"].rsplit("/", 1)[-1] for row in rows if row["status"] != "success"]
    assert sorted(failed_urls) == ["empty.png", "missing-404.png", "not-an-image.png"]
    assert sum(successes.values()) == 160
