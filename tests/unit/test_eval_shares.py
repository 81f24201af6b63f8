"""In-loop evaluation's shares: which samples each Train worker encodes (``share_of_parts``), and a worker's
share kept decoded between evaluations (``DecodedShares``: a real ViT-tiny on a real image folder)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import create_model
from orchestrator.eval import in_loop, open_eval_set, read_part, zero_shot
from orchestrator.eval.encode import FeatureEncoder
from orchestrator.eval.in_loop import DecodedShares, WorkerFeatures, share_of_parts
from orchestrator.eval.sets import SetPart

SAMPLES = 100  # per part


def _encoded(parts: int, world: int) -> list[list[tuple[int, int]]]:
    """(part, ordinal) of every sample each rank encodes."""
    set_parts = [SetPart(index, url=f"part-{index}.tar", samples=SAMPLES) for index in range(parts)]
    return [[(share.part.index, ordinal) for share in share_of_parts(set_parts, rank, world)
             for ordinal in range(SAMPLES) if ordinal % share.stride == share.offset] for rank in range(world)]


@pytest.mark.parametrize(("parts", "world"), [(5, 2), (4, 2), (1, 2), (7, 3), (3, 8), (10, 4), (64, 256), (6, 4)])
def test_every_sample_is_encoded_by_exactly_one_worker(parts, world):
    encoded = _encoded(parts, world)
    assert Counter(s for share in encoded for s in share) == Counter(
        (part, ordinal) for part in range(parts) for ordinal in range(SAMPLES))
    whole_parts_alone = max(len(range(rank, parts, world)) for rank in range(world)) * SAMPLES
    assert max(len(share) for share in encoded) <= whole_parts_alone


@pytest.mark.parametrize(("parts", "world"), [(5, 2), (7, 2), (1, 2), (6, 4), (3, 6), (64, 256)])
def test_shares_are_even_when_the_leftover_parts_divide_the_workers(parts, world):
    loads = [len(share) for share in _encoded(parts, world)]
    assert max(loads) - min(loads) <= 1, loads
    assert sum(loads) == parts * SAMPLES


def test_the_demo_set_is_split_evenly_and_each_worker_reads_three_parts():
    set_parts = [SetPart(index, url=f"{index:05d}.tar", samples=2000) for index in range(5)]
    first, second = (share_of_parts(set_parts, rank, 2) for rank in range(2))
    assert [(s.part.index, s.offset, s.stride) for s in first] == [(0, 0, 1), (2, 0, 1), (4, 0, 2)]
    assert [(s.part.index, s.offset, s.stride) for s in second] == [(1, 0, 1), (3, 0, 1), (4, 1, 2)]


def _photo_folder(root: Path, classes: list[str], per_class: int) -> Path:
    """ImageNet's layout (``<root>/val/<class>/<image>``) with small PNGs of distinct noise."""
    generator = np.random.default_rng(0)
    for name in classes:
        (root / "val" / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = generator.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "val" / name / f"{index}.png")
    return root / "val"


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return FeatureEncoder(create_model("ViT-tiny").eval())


@pytest.mark.parametrize(("budget_mb", "reads_after_first"), [(1, 0), (0.01, 2)])
def test_a_set_is_decoded_once_and_kept_while_it_fits(encoder, tmp_path, monkeypatch, budget_mb, reads_after_first):
    eval_set = open_eval_set(str(_photo_folder(tmp_path / "set", ["cat", "dog", "fox"], per_class=6)))
    reads = Counter()

    def counted(the_set, part, **kwargs):
        reads[part.index] += 1
        return read_part(the_set, part, **kwargs)

    monkeypatch.setattr(in_loop, "read_part", counted)
    decoded = DecodedShares(int(budget_mb * 2**20))  # 18 images of 3 x 32 x 32 bytes: 54 KiB, more than 0.01 MB

    def evaluate():
        source = WorkerFeatures(encoder, rank=0, world_size=1, batch_size=5, decoded=decoded)
        return zero_shot(source, eval_set, ["a photo of a {}."])

    first = evaluate()
    read_once = sum(reads.values())
    second, third = evaluate(), evaluate()
    assert read_once > 0 and sum(reads.values()) == read_once * (1 + reads_after_first)
    assert first.images == second.images == third.images == 18
    assert first.metrics == second.metrics == third.metrics
    assert np.array_equal(first.confusion, third.confusion)
    assert decoded.used_bytes == (18 * 3 * 32 * 32 if reads_after_first == 0 else 0)
