"""Reading one part of an evaluation set as a stream of samples (a Ray Data read task, or a Train worker).

A tar part is streamed with the training stream's reader (blocks of samples, retries that resume, damage
kept local); an image-folder part reads its files one by one. A sample that cannot be used (no image, no
label, no caption) is not dropped silently: it comes out as an error sample naming what is wrong, so the
caller counts it. A class index outside the set's class names is not a bad sample but a wrong set, and
stops the evaluation with the file and key named.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass

from orchestrator import storage
from orchestrator.data import IMAGE_EXTENSIONS, ShardRead, stream_shard
from orchestrator.eval.sets import EvalSet, EvalSetError, SetPart

READ_BLOCK_SAMPLES = 256


@dataclass
class EvalSample:
    """One evaluation sample: encoded image and its class index or captions; ``error`` names a bad one."""

    part: int
    ordinal: int
    key: str
    image: bytes = b""
    label: int = -1
    captions: tuple[str, ...] = ()
    error: str = ""

    @property
    def sample_id(self) -> int:
        """Unique within a set: the part index and the ordinal inside it."""
        return (self.part << 32) | self.ordinal


def read_part(eval_set: EvalSet, part: SetPart, *, retries: int = 2, backoff_s: float = 0.5,
              block_samples: int = READ_BLOCK_SAMPLES) -> Iterator[list[EvalSample]]:
    """The part's samples in blocks (bad ones included, with ``error`` set), at most ``part.limit``."""
    blocks = _read_files(eval_set, part, block_samples) if part.files else _read_tar(eval_set, part, retries, backoff_s, block_samples)
    remaining = part.limit
    for block in blocks:
        if remaining is not None:
            block = block[:remaining]
            remaining -= len(block)
        if block:
            yield block
        if remaining == 0:
            return


def _read_tar(eval_set: EvalSet, part: SetPart, retries: int, backoff_s: float,
              block_samples: int) -> Iterator[list[EvalSample]]:
    location = storage.resolve(part.url, eval_set.endpoint_url)
    build = _sample_builder(eval_set, part)
    read = ShardRead()
    for block in stream_shard(location, read, block_samples=block_samples, retries=retries, backoff_s=backoff_s,
                              sample_from=lambda ordinal, key, members: build(ordinal, key, members)):
        yield block
    if read.skipped or read.truncated:
        problem = "unreadable_shard" if read.skipped else "damaged_shard"
        if part.samples is None:  # what could not be read is unknown in number: one error sample records it
            yield [EvalSample(part.index, (1 << 32) - 1, part.url, error=problem)]
            return
        lost = range(part.samples - read.report(part.samples)["lost"], part.samples)  # the ordinals after the damage
        for start in range(0, len(lost), block_samples):
            yield [EvalSample(part.index, ordinal, part.url, error=problem)
                   for ordinal in lost[start:start + block_samples]]


def _sample_builder(eval_set: EvalSet, part: SetPart):
    """(ordinal, key, members) -> EvalSample for this set's layout and kind; errors as error samples."""
    classes = len(eval_set.class_names)

    def build(ordinal: int, key: str, members: dict[str, bytes]) -> EvalSample:
        sample = EvalSample(part.index, ordinal, key)
        image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
        if image is None:
            return dataclasses.replace(sample, error="missing_image")
        sample.image = image
        if eval_set.kind == "retrieval":
            captions = tuple(line.strip() for line in members.get("txt", b"").decode("utf-8", "replace").splitlines()
                             if line.strip())
            return dataclasses.replace(sample, captions=captions) if captions else dataclasses.replace(sample, error="missing_caption")
        label = _label_of(members, eval_set.layout)
        if label is None:
            return dataclasses.replace(sample, image=b"", error="missing_label")
        if not 0 <= label < classes:
            raise EvalSetError(f"{part.url}: sample {key!r} has class index {label}, outside the {classes} class "
                               f"names of {eval_set.classnames_url} (valid: 0..{classes - 1})")
        sample.label = label
        return sample

    return build


def _label_of(members: dict[str, bytes], layout: str) -> int | None:
    """The class index: ``KEY.cls`` (CLIP_benchmark, webdataset's writer) or ``label`` in ``KEY.json`` (rayclip)."""
    try:
        if "cls" in members:
            return int(members["cls"].decode("ascii").strip())
        if "json" in members:
            label = json.loads(members["json"]).get("label")
            return label if isinstance(label, int) else None
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return None


def _read_files(eval_set: EvalSet, part: SetPart, block_samples: int) -> Iterator[list[EvalSample]]:
    block = []
    for ordinal, (url, label) in enumerate(zip(part.files, part.labels)):
        sample = EvalSample(part.index, ordinal, url.rsplit("/", 1)[-1], label=label)
        try:
            sample.image = storage.read_bytes(storage.resolve(url, eval_set.endpoint_url))
        except OSError:
            sample.error = "unreadable_file"
        block.append(sample)
        if len(block) == block_samples:
            yield block
            block = []
    if block:
        yield block


def limit_set(eval_set: EvalSet, max_images: int | None) -> EvalSet:
    """The set cut to its first ``max_images`` samples in part order (quick checks); parts whose counts the
    layout does not record (CLIP_benchmark tars) are counted by reading them, in order, until the cut."""
    if max_images is None:
        return eval_set
    parts, remaining = [], max_images
    for part in eval_set.parts:
        count = len(part.files) if part.files else part.samples
        if count is None:
            count = sum(len(block) for block in read_part(eval_set, part))
        take = min(count, remaining)
        parts.append(dataclasses.replace(part, limit=take if take < count else None))
        remaining -= take
        if remaining == 0:
            break
    samples = max_images - remaining
    return dataclasses.replace(eval_set, parts=parts, samples=samples)
