"""The benchmark sets of ``tests/clip_benchmark_sets.py`` are what CLIP_benchmark itself makes of them: written by
its ``convert_dataset`` / ``convert_retrieval_dataset`` and read back by its ``build_dataset("wds/...")`` (both in
the venv of ``scripts/install_clip_benchmark.sh``), they hold exactly the Fashion-MNIST images and labels, the
class names and templates, and every caption of every stamp, in order; the ImageNet-style tree holds the same
images under the same class indices.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from orchestrator.data import FASHION_MNIST_CLASSES
from tests.clip_benchmark_sets import (
    class_folder_names,
    fashion_mnist_images,
    read_with_clip_benchmark,
    stamp_captions,
    write_classification_set,
    write_image_folder,
    write_retrieval_set,
)

pytestmark = pytest.mark.integration

SPLITS = {"train": 40, "test": 130}
TEMPLATES = ("a photo of a {c}.", "a black and white photo of a {c}.")
STAMPS = 70
PER_SHARD = 50


def rgb_sha256(image: Image.Image) -> str:
    """The digest the reader reports: its decoder converts every image to RGB."""
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def shard_count(split_dir: Path) -> int:
    assert int((split_dir / "nshards.txt").read_text()) == len(list(split_dir.glob("*.tar")))
    return len(list(split_dir.glob("*.tar")))


@pytest.fixture(scope="module")
def classification_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clip-benchmark") / "fashion_mnist"
    return write_classification_set(root, SPLITS, image_format="webp", templates=TEMPLATES, max_count=PER_SHARD)


@pytest.fixture(scope="module")
def retrieval_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_retrieval_set(tmp_path_factory.mktemp("clip-benchmark") / "stamps", STAMPS, max_count=PER_SHARD)


def test_classification_set_reads_back_as_fashion_mnist(classification_set: Path):
    assert shard_count(classification_set / "test") == 3 and shard_count(classification_set / "train") == 1
    assert not (classification_set / "dataset_type.txt").exists()
    read = read_with_clip_benchmark(classification_set, list(SPLITS), task="zeroshot_classification")
    for split, count in SPLITS.items():
        images, labels = fashion_mnist_images(split, count)
        assert read[split]["classes"] == list(FASHION_MNIST_CLASSES)
        assert read[split]["templates"] == list(TEMPLATES)
        samples = read[split]["samples"]
        assert [sample["label"] for sample in samples] == labels.tolist()
        assert {(sample["mode"], tuple(sample["size"])) for sample in samples} == {("RGB", (28, 28))}
        # lossless webp: the decoded pixels are the gray originals, replicated into RGB by the reader
        expected = [rgb_sha256(Image.fromarray(image)) for image in images]
        assert [sample["pixels_sha256"] for sample in samples] == expected


def test_retrieval_set_reads_back_with_every_caption(retrieval_set: Path):
    assert (retrieval_set / "dataset_type.txt").read_text().strip() == "retrieval"
    assert shard_count(retrieval_set / "test") == 2
    assert not (retrieval_set / "classnames.txt").exists()
    expected = stamp_captions(STAMPS)
    read = read_with_clip_benchmark(retrieval_set, ["test"], task="zeroshot_retrieval")["test"]
    assert read["classes"] is None and read["templates"] is None
    samples = read["samples"]
    assert [sample["captions"] for sample in samples] == [captions for _, captions in expected]
    assert all(len(sample["captions"]) == 3 for sample in samples)  # English line, file name, French line
    assert expected[2][1] == ["An Adelaide Rosella.", "adelaide rosella", "Une perruche Adélaïde."]
    assert [sample["pixels_sha256"] for sample in samples] == [rgb_sha256(Image.open(image)) for image, _ in expected]


def test_image_folder_holds_the_same_images_under_the_same_class_indices(tmp_path: Path):
    root = write_image_folder(tmp_path / "fashion_mnist_folder", "test", SPLITS["test"])
    folder = ImageFolder(str(root / "test"))
    images, labels = fashion_mnist_images("test", SPLITS["test"])
    assert folder.classes == class_folder_names()
    assert (root / "classnames.txt").read_text().splitlines() == list(FASHION_MNIST_CLASSES)
    order = sorted(range(len(labels)), key=lambda index: (labels[index], index))  # by class, then split position
    assert folder.targets == [int(labels[index]) for index in order]
    for (path, _), index in zip(folder.samples, order):
        assert Path(path).name == f"{index:05d}.png"
        np.testing.assert_array_equal(np.asarray(Image.open(path)), images[index])


def test_lossy_formats_and_templates_without_the_class_slot_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="image_format"):
        write_classification_set(tmp_path, {"test": 1}, image_format="jpg")
    with pytest.raises(ValueError, match="templates"):
        write_classification_set(tmp_path, {"test": 1}, templates=("a photo of a {}.",))
