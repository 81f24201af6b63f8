"""CLIP_benchmark's own writer and reader, run under the venv of ``scripts/install_clip_benchmark.sh`` by
``tests/clip_benchmark_sets.py`` (never imported by rayclip's tests, whose environment has no clip_benchmark):

    python clip_benchmark_builder.py classification|retrieval|read < SPEC_JSON

``classification`` and ``retrieval`` write a set with ``convert_dataset`` / ``convert_retrieval_dataset``;
``read`` describes what ``build_dataset("wds/...")`` yields and writes that as JSON to ``spec["output"]``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch.utils.data
from clip_benchmark.datasets.builder import build_dataset
from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset, convert_retrieval_dataset, path_to_bytes
from PIL import Image


class EncodedGrayImages(torch.utils.data.Dataset):
    """(encoded image, class index) pairs with ``classes`` and ``templates``, as ``convert_dataset`` takes them.

    The images are encoded here, in its DataLoader's workers, and it is given ``transform=None``: its docstring's
    fast path for raw binary data.
    """

    def __init__(self, npz: str, classes: list[str], templates: list[str], image_format: str):
        arrays = np.load(npz)
        self.images, self.labels = arrays["images"], arrays["labels"]  # (N, 28, 28) uint8, (N,)
        self.classes, self.templates = classes, templates
        self.encode = PIL_to_bytes(image_format)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        return self.encode(Image.fromarray(self.images[index], mode="L")), int(self.labels[index])


def write_classification(spec: dict) -> None:
    for split, npz in spec["splits"].items():
        dataset = EncodedGrayImages(npz, spec["classes"], spec["templates"], spec["image_format"])
        convert_dataset(dataset, split, spec["root"], image_format=spec["image_format"], max_count=spec["max_count"])


def write_retrieval(spec: dict) -> None:
    samples = [(path, captions) for path, captions in spec["samples"]]  # image files are copied, not re-encoded
    convert_retrieval_dataset(samples, spec["split"], spec["root"], transform=path_to_bytes,
                              max_count=spec["max_count"])


def describe_sample(image: Image.Image, target: int | list[str]) -> dict:
    """One sample as the reader decoded it: its label or captions, PIL mode, size and a digest of the pixels."""
    key = "captions" if isinstance(target, list) else "label"
    return {key: target, "mode": image.mode, "size": list(image.size),
            "pixels_sha256": hashlib.sha256(np.asarray(image).tobytes()).hexdigest()}


def read(spec: dict) -> None:
    result = {}
    for split in spec["splits"]:
        dataset = build_dataset(f"wds/{Path(spec['root']).name}", root=spec["root"], split=split, task=spec["task"])
        result[split] = {"classes": dataset.classes, "templates": dataset.templates,
                         "samples": [describe_sample(image, target) for image, target in dataset]}
    Path(spec["output"]).write_text(json.dumps(result))


if __name__ == "__main__":
    # clip_benchmark's DataLoaders (8 workers) take a lambda collate_fn, which only a forked worker can get
    # (Python 3.14 makes forkserver Linux's default).
    torch.multiprocessing.set_start_method("fork")
    command, spec = sys.argv[1], json.load(sys.stdin)
    {"classification": write_classification, "retrieval": write_retrieval, "read": read}[command](spec)
