"""Zero-shot classifier, accuracy, confusion matrix and retrieval recall."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import create_model
from models.zero_shot import (
    IMAGENET_TEMPLATES,
    accuracy,
    build_zero_shot_classifier,
    classify,
    confusion_matrix,
    retrieval_recall,
)


class BagOfTokens(torch.nn.Module):
    """A text encoder whose embedding of a text is the sum of fixed per-token vectors (easy to predict)."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(50_000, 8, generator=torch.Generator().manual_seed(0)))

    def encode_text(self, tokens):
        return self.table[tokens].sum(dim=1)


def fake_tokenizer(texts):
    """Maps each distinct word to a stable id (deterministic, no vocabulary file needed)."""
    rows = [[sum(map(ord, word)) % 50_000 for word in text.split()] for text in texts]
    out = torch.zeros(len(texts), max(map(len, rows)), dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def test_the_papers_80_imagenet_templates():
    assert len(IMAGENET_TEMPLATES) == len(set(IMAGENET_TEMPLATES)) == 80
    assert all(template.count("{}") == 1 for template in IMAGENET_TEMPLATES)
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert [t.format("x") for t in IMAGENET_TEMPLATES] == [t("x") for t in OPENAI_IMAGENET_TEMPLATES]


def test_classifier_averages_normalised_template_embeddings_per_class():
    model = BagOfTokens()
    classes = ["cat", "dog", "truck"]
    templates = ["a photo of a {}.", "a drawing of the {}."]
    classifier = build_zero_shot_classifier(model, fake_tokenizer, classes, templates, batch_size=4)
    assert classifier.shape == (8, 3)
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(3))
    for column, name in enumerate(classes):
        per_template = F.normalize(model.encode_text(fake_tokenizer([t.format(name) for t in templates])), dim=-1)
        expected = F.normalize(per_template.mean(dim=0), dim=0)
        torch.testing.assert_close(classifier[:, column], expected.detach())


def test_classifier_with_a_real_clip_model_and_classification_shape():
    model = create_model("ViT-tiny").eval()
    classifier = build_zero_shot_classifier(model, fake_tokenizer_with_specials, ["shirt", "shoe"], IMAGENET_TEMPLATES[:3])
    logits = classify(model, torch.randn(5, 3, 32, 32), classifier)
    assert logits.shape == (5, 2)
    assert logits.abs().max() <= 1.0 + 1e-5  # cosine similarities


def fake_tokenizer_with_specials(texts):
    tokens = fake_tokenizer(texts) % 49000 + 1
    out = torch.zeros(len(texts), 77, dtype=torch.long)
    out[:, 0] = 49406
    out[:, 1 : 1 + tokens.shape[1]] = tokens
    out[:, 1 + tokens.shape[1]] = 49407
    return out


def test_accuracy_top1_top5_and_capped_k():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 1, 1, 2])
    result = accuracy(logits, labels, topk=(1, 2, 5))
    assert result == {"top1": 0.5, "top2": 0.75, "top5": 1.0}


def test_confusion_matrix_counts_true_by_predicted():
    matrix = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_retrieval_recall_on_known_rankings():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(20, 16), dim=-1)
    assert retrieval_recall(images, images, ks=(1,)) == {"image_to_text_R@1": 1.0, "text_to_image_R@1": 1.0}
    shuffled = images[torch.roll(torch.arange(20), 1)]  # every caption belongs to the next image
    recall = retrieval_recall(images, shuffled, ks=(1, 20))
    assert recall["image_to_text_R@1"] < 0.2 and recall["image_to_text_R@20"] == 1.0
    with pytest.raises(ValueError, match="one caption per image"):
        retrieval_recall(images, images[:5])
