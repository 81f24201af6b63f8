"""Benchmark sets in CLIP_benchmark's WebDataset layout (how LAION publishes them on the Hugging Face Hub) for
tests, written by clip_benchmark's own writer and read back by its own reader; both run in the venv of
``scripts/install_clip_benchmark.sh`` through ``tests/clip_benchmark_builder.py``. The layout::

    root/classnames.txt                          one class name a line, in class-index order (classification)
    root/zeroshot_classification_templates.txt   one template a line, with {c} for the class name
    root/dataset_type.txt                        "retrieval" (absent for classification)
    root/<split>/nshards.txt, root/<split>/0.tar, 1.tar, ...
        sNNNNNNN.png|webp  + sNNNNNNN.cls (class index) or sNNNNNNN.txt (captions, one a line)

Also the same Fashion-MNIST images as an ImageNet-style folder tree, which needs no tool.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from orchestrator.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx
from tests.img2dataset_output import captioned_stamps

VENV = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rayclip" / "clip-benchmark-venv"
BUILDER = Path(__file__).with_name("clip_benchmark_builder.py")
IDX_PREFIX = {"train": "train", "test": "t10k"}  # Debian's file names for the two splits
LOSSLESS_FORMATS = ("png", "webp")  # clip_benchmark's PIL_to_bytes saves webp losslessly


def fashion_mnist_images(split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` images of Fashion-MNIST ``split`` ("train", or "test" = Debian's t10k files) in file
    order: uint8 images (count, 28, 28) and their class indices into ``FASHION_MNIST_CLASSES`` (count,)."""
    if split not in IDX_PREFIX:
        raise ValueError(f"split must be one of {sorted(IDX_PREFIX)}, got {split!r}")
    images = read_idx(f"{FASHION_MNIST_DIR}/{IDX_PREFIX[split]}-images-idx3-ubyte.gz")
    labels = read_idx(f"{FASHION_MNIST_DIR}/{IDX_PREFIX[split]}-labels-idx1-ubyte.gz")
    if not 0 < count <= len(labels):
        raise ValueError(f"count for split {split!r} must be in 1..{len(labels)}, got {count}")
    return images[:count], labels[:count]


def write_classification_set(root: Path, splits: dict[str, int], *, image_format: str = "png",
                             templates: Sequence[str] = ("a photo of a {c}.",), max_count: int = 50) -> Path:
    """Write Fashion-MNIST as a zero-shot classification set with ``clip_benchmark``'s ``convert_dataset``.

    ``splits`` maps "train"/"test" to how many of its first images to write (``fashion_mnist_images``, in
    order: sample ``s0000000`` is image 0), each a native 28x28 grayscale image saved losslessly as
    ``image_format`` with its class index; ``max_count`` images a shard. The class names are
    ``FASHION_MNIST_CLASSES``; ``templates`` use ``{c}``. Returns ``root``.
    """
    if image_format not in LOSSLESS_FORMATS:
        raise ValueError(f"image_format must be one of {LOSSLESS_FORMATS} (lossless), got {image_format!r}")
    if not templates or any("{c}" not in template for template in templates):
        raise ValueError(f"templates must be non-empty and each contain '{{c}}', got {list(templates)}")
    with tempfile.TemporaryDirectory(prefix="fashion-mnist-") as arrays:
        npz = {}
        for split, count in splits.items():
            images, labels = fashion_mnist_images(split, count)
            npz[split] = f"{arrays}/{split}.npz"
            np.savez(npz[split], images=images, labels=labels)
        _run_builder("classification", {
            "root": str(root), "splits": npz, "classes": list(FASHION_MNIST_CLASSES), "templates": list(templates),
            "image_format": image_format, "max_count": max_count,
        })
    return root


def stamp_captions(limit: int, *, translations: Iterable[str] = ("fr",)) -> list[tuple[Path, list[str]]]:
    """The first ``limit`` captioned Tux Paint stamps (``captioned_stamps``) with several captions each.

    In order: the English line of NAME.txt, the stamp's file name in words ("adelaide-rosella.png" ->
    "adelaide rosella"), and NAME.txt's line for each language code in ``translations`` where it has one
    ("fr.utf8=Une perruche Adélaïde."); a caption equal to an earlier one of the same stamp is dropped.
    Different stamps may share captions (frog.png and frog-1.png are both "A frog.").
    """
    stamps = []
    for image, english in captioned_stamps(limit):
        lines = image.with_suffix(".txt").read_text(errors="replace").splitlines()
        translated = dict(line.split(".utf8=", 1) for line in lines if ".utf8=" in line)  # code -> text
        captions = [english, re.sub(r"[-_\s]+", " ", image.stem).strip().lower()]
        captions += [translated[code].strip() for code in translations if translated.get(code, "").strip()]
        stamps.append((image, list(dict.fromkeys(captions))))
    return stamps


def write_retrieval_set(root: Path, limit: int, *, split: str = "test", translations: Iterable[str] = ("fr",),
                        max_count: int = 50) -> Path:
    """Write the stamps of ``stamp_captions(limit, translations=...)`` as a zero-shot retrieval set with
    ``clip_benchmark``'s ``convert_retrieval_dataset``, copying each PNG's bytes (``path_to_bytes``).

    Sample ``s000000i`` is stamp ``i`` with its captions in that order; ``max_count`` images a shard.
    Returns ``root``; call ``stamp_captions`` with the same arguments for which captions belong to which image.
    """
    samples = [(str(image), captions) for image, captions in stamp_captions(limit, translations=translations)]
    _run_builder("retrieval", {"root": str(root), "split": split, "samples": samples, "max_count": max_count})
    return root


def class_folder_names() -> list[str]:
    """ImageFolder folder names for ``FASHION_MNIST_CLASSES``: "00-t-shirt" ... "09-ankle-boot", so that sorted
    folder names (ImageFolder's rule for class indices) follow the class index."""
    return [f"{index:02d}-{name.replace(' ', '-')}" for index, name in enumerate(FASHION_MNIST_CLASSES)]


def write_image_folder(root: Path, split: str, count: int) -> Path:
    """Write the first ``count`` Fashion-MNIST ``split`` images as an ImageNet-style tree and return ``root``.

    ``root/<split>/<class folder>/<index>.png`` (``class_folder_names``; ``index`` zero-padded to 5 digits,
    its position in the split, so each folder lists in split order) holds the native 28x28 grayscale image;
    ``root/classnames.txt`` has ``FASHION_MNIST_CLASSES`` one a line, in class-index order.
    """
    images, labels = fashion_mnist_images(split, count)
    folders = class_folder_names()
    for folder in folders:
        (root / split / folder).mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image, mode="L").save(root / split / folders[label] / f"{index:05d}.png")
    (root / "classnames.txt").write_text("".join(f"{name}\n" for name in FASHION_MNIST_CLASSES))
    return root


def read_with_clip_benchmark(root: Path, splits: Sequence[str], *, task: str) -> dict[str, dict]:
    """What ``clip_benchmark``'s reader, ``build_dataset("wds/<root name>", root=..., split=..., task=task)``,
    yields for each split: ``{"classes", "templates", "samples"}`` (``None`` for a retrieval set's classes and
    templates), each sample ``{"label": int}`` or ``{"captions": [...]}`` with its decoded image's PIL
    ``"mode"``, ``"size"`` and ``"pixels_sha256"`` (of ``np.asarray(image).tobytes()``; its decoder converts
    every image to RGB)."""
    with tempfile.TemporaryDirectory(prefix="clip-benchmark-read-") as scratch:
        output = Path(scratch) / "read.json"
        _run_builder("read", {"root": str(root), "splits": list(splits), "task": task, "output": str(output)})
        return json.loads(output.read_text())


def _run_builder(command: str, spec: dict) -> None:
    python = VENV / "bin" / "python"
    if not python.exists():
        raise RuntimeError(f"{python} is missing: run bash scripts/install_clip_benchmark.sh")
    done = subprocess.run([str(python), str(BUILDER), command], input=json.dumps(spec), capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"clip_benchmark_builder.py {command} exited with {done.returncode}:\n{done.stderr[-6000:]}")
