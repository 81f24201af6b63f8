"""Zero-shot classification and retrieval, as evaluated in the paper.

Class names go through prompt templates; each class's text embeddings are L2-normalised, averaged over
templates and renormalised (the paper's prompt ensembling). Images are classified by argmax cosine
similarity against those class embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

SIMPLE_TEMPLATES = ("a photo of a {}.",)

# The 80 prompt templates the paper ensembles for ImageNet.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

Tokenizer = Callable[[list[str]], torch.Tensor]


@torch.no_grad()
def build_zero_shot_classifier(
    model,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str] = SIMPLE_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """(embed_dim, n_classes) matrix of normalised, template-averaged class embeddings.

    ``model`` is anything with ``encode_text(tokens)`` (a :class:`models.CLIP`). Texts are encoded in
    batches of ``batch_size`` on the device of the model's parameters.
    """
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    device = next(model.parameters()).device
    texts = [template.format(name) for name in classnames for template in templates]  # class-major
    features = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start : start + batch_size]).to(device)
        features.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    per_template = torch.cat(features).view(len(classnames), len(templates), -1)  # (C, T, E)
    return F.normalize(per_template.mean(dim=1), dim=-1).T  # (E, C)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies, as fractions, keyed ``top1``, ``top5``, ... (k above the class count is capped)."""
    max_k = min(max(topk), logits.shape[1])
    predictions = logits.topk(max_k, dim=1).indices  # (N, max_k)
    hits = predictions == labels.view(-1, 1)  # (N, max_k)
    return {f"top{k}": hits[:, : min(k, max_k)].any(dim=1).float().mean().item() for k in topk}


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true class, predicted class) counts."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def retrieval_recall(
    image_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k for image->text and text->image retrieval over paired rows (row i of each matches).

    Keys: ``image_to_text_R@k`` and ``text_to_image_R@k``.
    """
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError("retrieval needs one caption per image (paired rows)")
    similarity = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T  # (N, N)
    targets = torch.arange(similarity.shape[0], device=similarity.device)
    results = {}
    for direction, scores in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        # Rank of the true match = how many candidates score strictly higher.
        true_scores = scores[targets, targets].unsqueeze(1)  # (N, 1)
        ranks = (scores > true_scores).sum(dim=1)  # (N,)
        for k in ks:
            results[f"{direction}_R@{k}"] = (ranks < k).float().mean().item()
    return results


def classify(model, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(N, n_classes) cosine-similarity logits of a batch of preprocessed images against a classifier."""
    with torch.no_grad():
        features = F.normalize(model.encode_image(images).float(), dim=-1)
    return features @ classifier
