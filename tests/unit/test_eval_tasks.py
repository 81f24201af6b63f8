"""Zero-shot, retrieval and the linear probe on fixed features (the model is stubbed: these check the arithmetic).

A :class:`FixedFeatures` source answers as a feature source does, from tensors given up front, so every
expected number here is worked out by hand in the test.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import retrieval_recall
from orchestrator.eval import EvalSet, ImageBatch, linear_probe, retrieval, zero_shot
from orchestrator.eval import probe as probe_module


class FixedFeatures:
    """A feature source of one process: text features by text, image batches by set name.

    ``chief=False`` plays another rank: what it would send to the chief is kept in ``sent``, to be handed to
    the chief's source as one of ``other_shares``."""

    def __init__(self, text: dict[str, torch.Tensor] | None = None, batches: dict[str, list[ImageBatch]] | None = None,
                 *, chief: bool = True, other_shares: list | None = None):
        self.text, self.batches = text or {}, batches or {}
        self.chief, self.other_shares = chief, other_shares or []
        self.asked: list[str] = []
        self.sent = None

    def text_features(self, texts):
        self.asked.extend(texts)
        return torch.stack([self.text[t] for t in texts])

    def image_batches(self, eval_set, *, captions=False):
        yield from self.batches[eval_set.name]

    def sum_over_ranks(self, totals):
        return totals

    def gather_to_chief(self, value):
        self.sent = value
        return [value, *self.other_shares] if self.chief else None


def classification_set(name: str, class_names: list[str], templates: list[str] = ("a {}.",)) -> EvalSet:
    return EvalSet(name, "clip_benchmark", "classification", "test", f"/sets/{name}", [],
                   class_names=list(class_names), templates=list(templates))


def batch(features, labels, ids, bad: dict | None = None, captions=None) -> ImageBatch:
    return ImageBatch(torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(labels),
                      torch.as_tensor(ids), caption_features=captions or [], bad=Counter(bad or {}))


CLASSES = ["cat", "dog", "fox", "owl", "eel", "yak"]  # "yak" has no test image


def one_hot_text(templates: list[str]) -> dict[str, torch.Tensor]:
    """Every prompt of class c is the unit vector e_c: the classifier is the identity, logits = image features."""
    return {template.format(name): F.one_hot(torch.tensor(c), len(CLASSES)).float()
            for c, name in enumerate(CLASSES) for template in templates}


def scores_ranking(label: int, rank: int) -> list[float]:
    """Six distinct scores that put class ``label`` at 0-based ``rank`` (the others in index order)."""
    others = [c for c in range(len(CLASSES)) if c != label]
    order = others[:rank] + [label] + others[rank:]
    values = [0.0] * len(CLASSES)
    for place, c in enumerate(order):
        values[c] = 0.9 - 0.1 * place
    return values


def test_zero_shot_counts_top1_top5_and_mean_per_class_recall():
    # (label, rank of the true class): top-1 hits 3/6, top-5 hits 5/6 (the fox ranks last).
    cases = [(0, 0), (0, 1), (1, 0), (2, 5), (3, 0), (4, 2)]
    features = [scores_ranking(label, rank) for label, rank in cases]
    labels = [label for label, _ in cases]
    templates = ["a {}.", "the {}."]
    source = FixedFeatures(one_hot_text(templates), {"pets": [
        batch(features[:4], labels[:4], [0, 1, 2, 3], bad={"missing_label": 2}),
        batch(features[4:], labels[4:], [4, 5], bad={"undecodable_image": 1}),
    ]})
    result = zero_shot(source, classification_set("pets", CLASSES, templates))
    assert source.asked == [t.format(name) for name in CLASSES for t in templates]  # class-major prompts
    assert result.metrics["zeroshot_top1"] == pytest.approx(3 / 6)
    assert result.metrics["zeroshot_top5"] == pytest.approx(5 / 6)
    # Per-class recall: cat 1/2, dog 1, fox 0, owl 1, eel 0; yak has no sample and is left out of the mean.
    assert result.per_class == pytest.approx({"cat": 0.5, "dog": 1.0, "fox": 0.0, "owl": 1.0, "eel": 0.0})
    assert result.metrics["zeroshot_mean_per_class_recall"] == pytest.approx(2.5 / 5)
    assert result.images == 6 and result.bad_samples == {"missing_label": 2, "undecodable_image": 1}
    expected = np.zeros((6, 6), dtype=np.int64)
    for (label, rank), row in zip(cases, features):
        expected[label, int(np.argmax(row))] += 1
    np.testing.assert_array_equal(result.confusion, expected)
    assert expected[0, 1] == 1 and expected[2, 0] == 1  # the misses were confused with the top-scored class
    assert result.headline == "pets zero-shot top-1: 0.500"
    assert result.details["templates"] == 2


def test_zero_shot_templates_override_the_sets_own():
    source = FixedFeatures(one_hot_text(["itap of a {}."]), {"pets": [batch([scores_ranking(1, 0)], [1], [0])]})
    result = zero_shot(source, classification_set("pets", CLASSES), templates=["itap of a {}."])
    assert source.asked == [f"itap of a {name}." for name in CLASSES]
    assert result.metrics["zeroshot_top1"] == 1.0


def test_zero_shot_with_no_evaluable_image_says_so():
    nothing = torch.zeros(0, dtype=torch.long)
    source = FixedFeatures(one_hot_text(["a {}."]), {"pets": [batch(torch.zeros(0, 6), nothing, nothing, {"missing_image": 3})]})
    with pytest.raises(ValueError, match="pets: no image could be evaluated .*missing_image"):
        zero_shot(source, classification_set("pets", CLASSES))


def retrieval_set(name: str = "captions") -> EvalSet:
    return EvalSet(name, "clip_benchmark", "retrieval", "test", f"/sets/{name}", [])


def retrieval_batches(images: torch.Tensor, captions: list[torch.Tensor], ids: list[int]) -> ImageBatch:
    return batch(images, [-1] * len(ids), ids, captions=captions)


def test_retrieval_with_identical_image_and_caption_features_finds_everything():
    images = F.normalize(torch.randn(7, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    source = FixedFeatures(batches={"captions": [
        retrieval_batches(images[:4], [images[i:i + 1] for i in range(4)], [0, 1, 2, 3]),
        retrieval_batches(images[4:], [images[i:i + 1] for i in range(4, 7)], [4, 5, 6]),
    ]})
    result = retrieval(source, retrieval_set())
    assert result.metrics == {f"{d}_recall_at_{k}": 1.0 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert result.images == 7 and result.details["captions"] == 7


# Three images, six captions (I0: c0 c1, I1: c2 c5, I2: c3 c4); s = 1/sqrt(2) makes exact ties.
S = 2 ** -0.5
IMAGES = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
CAPTIONS = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.6, 0.8, 0], [0.8, 0, 0.6], [S, 0, S], [0, S, S]])
CAPTION_IMAGE = torch.tensor([0, 0, 1, 2, 2, 1])
# Caption ranks (images scoring strictly higher than its own): c1 (I1 beats I0) and c3 (I0 .8 > I2 .6) are 1;
# c4 and c5 tie between two images and count as found: text->image R@1 = 4/6.
# Image ranks (captions above its best own): I1's best is c2 (.8) but c1 scores 1; I2's best c4 (s) ties c5:
# image->text R@1 = 2/3. Everything is found at 2.
KNOWN = {"image_to_text_R@1": 2 / 3, "image_to_text_R@2": 1.0, "text_to_image_R@1": 4 / 6, "text_to_image_R@2": 1.0}


@pytest.mark.parametrize("block_size", [1, 2, 1024])
def test_retrieval_recall_with_several_captions_per_image(block_size):
    recall = retrieval_recall(IMAGES, CAPTIONS, (1, 2), text_image=CAPTION_IMAGE, block_size=block_size)
    assert recall == pytest.approx(KNOWN)


def test_retrieval_recall_rejects_captions_that_name_no_image():
    with pytest.raises(ValueError, match="every image needs at least one caption"):
        retrieval_recall(IMAGES, CAPTIONS[:2], text_image=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="the row of an existing image"):
        retrieval_recall(IMAGES, CAPTIONS[:3], text_image=torch.tensor([0, 1, 3]))


def test_retrieval_task_on_several_captions_per_image_in_any_share_order():
    def share(rows: list[int]) -> ImageBatch:
        return retrieval_batches(IMAGES[rows], [CAPTIONS[CAPTION_IMAGE == row] for row in rows], rows)

    one = retrieval(FixedFeatures(batches={"captions": [share([0, 1, 2])]}), retrieval_set())
    # Two ranks, each with part of the set, out of order: merged by sample id, the same numbers.
    other_rank = FixedFeatures(batches={"captions": [share([1])]}, chief=False)
    assert retrieval(other_rank, retrieval_set()) is None
    two = retrieval(FixedFeatures(batches={"captions": [share([2]), share([0])]}, other_shares=[other_rank.sent]),
                    retrieval_set())
    for result in (one, two):
        assert result.metrics["image_to_text_recall_at_1"] == pytest.approx(2 / 3)
        assert result.metrics["text_to_image_recall_at_1"] == pytest.approx(4 / 6)
        assert result.metrics["image_to_text_recall_at_5"] == 1.0
        assert result.metrics["text_to_image_recall_at_10"] == 1.0
        assert result.images == 3 and result.details["captions"] == 6
    assert one.headline == "captions retrieval recall@1: image->text 0.667, text->image 0.667"


def blobs(per_class: int, seed: int, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 8 dimensions at unit vectors (the scale of normalised embeddings), standard
    deviation 0.1; ``noise``: the fraction of labels moved to another class at random."""
    generator = np.random.default_rng(seed)
    centres = np.eye(3, 8)
    labels = np.repeat(np.arange(3), per_class)
    features = centres[labels] + generator.normal(scale=0.1, size=(len(labels), 8))
    flip = generator.random(len(labels)) < noise
    labels = np.where(flip, (labels + generator.integers(1, 3, len(labels))) % 3, labels)
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


def probe_source(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]) -> FixedFeatures:
    def batches(features, labels):
        ids = torch.arange(len(labels))
        half = len(labels) // 2
        return [batch(features[half:], labels[half:], ids[half:]), batch(features[:half], labels[:half], ids[:half])]

    return FixedFeatures(batches={"blobs-train": batches(*train), "blobs-test": batches(*test)})


def test_linear_probe_separates_far_apart_blobs():
    names = ["a", "b", "c"]
    source = probe_source(blobs(30, seed=0), blobs(10, seed=1))
    result = linear_probe(source, classification_set("blobs-train", names), classification_set("blobs-test", names))
    assert result.metrics["linear_probe_top1"] == 1.0
    assert result.per_class == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert result.images == 30
    assert (result.details["train_samples"], result.details["validation_samples"]) == (72, 18)
    assert result.details["validation_top1"] == 1.0
    visited = sorted(float(c) for c in result.details["sweep_log10_C"])
    assert {-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0} <= set(visited)
    best = np.log10(result.metrics["linear_probe_C"])
    assert min(abs(c - best) for c in visited if c != best) == pytest.approx(0.125)  # 8 steps a decade at the best


def test_linear_probe_with_label_noise_scores_below_one():
    names = ["a", "b", "c"]
    source = probe_source(blobs(30, seed=2, noise=0.2), blobs(20, seed=3, noise=0.2))
    result = linear_probe(source, classification_set("blobs-train", names), classification_set("blobs-test", names))
    assert 0.6 < result.metrics["linear_probe_top1"] < 1.0


def test_linear_probe_refuses_splits_with_different_classes():
    source = probe_source(blobs(4, seed=0), blobs(2, seed=1))
    with pytest.raises(ValueError, match="name different classes"):
        linear_probe(source, classification_set("blobs-train", ["a", "b", "c"]),
                     classification_set("blobs-test", ["a", "b", "x"]))


def test_c_search_halves_the_interval_around_the_best_down_to_8_steps_a_decade(monkeypatch):
    """Validation top-1 peaked at log10 C = 2.4 (the fit is stubbed): the visits follow the peak."""

    class Peaked:
        def __init__(self, c_log10):
            self.c_log10 = c_log10

        def score(self, x, y):
            return 1.0 - abs(self.c_log10 - 2.4) / 10

    monkeypatch.setattr(probe_module, "_fit", lambda c_log10, features, labels, seed: Peaked(c_log10))
    sweep = probe_module.search_c(None, None, None, None)
    # coarse grid; best 2 -> 1, 3; best 2 -> 1.5, 2.5; best 2.5 -> 2.25, 2.75; best 2.5 -> 2.375, 2.625
    assert sorted(sweep) == [-6, -4, -2, 0, 1, 1.5, 2, 2.25, 2.375, 2.5, 2.625, 2.75, 3, 4, 6]
    assert max(sweep, key=sweep.get) == 2.375


def test_linear_probe_on_a_small_training_split_with_many_classes():
    """``max_train_images: 30`` on a 10-class set: 3 images a class, a validation part of 6."""
    generator = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 3)
    features = np.eye(10, 16)[labels] + generator.normal(scale=0.05, size=(30, 16))
    result = probe_module.linear_probe(features, labels, features, labels, classes=10)
    assert result.validation_samples == 6 and result.top1 > 0.5
