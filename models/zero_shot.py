"""Zero-shot classification and retrieval, as evaluated in the paper.

Class names go through prompt templates; each class's text embeddings are L2-normalised, averaged over
templates and renormalised (the paper's prompt ensembling). Images are classified by argmax cosine
similarity against those class embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

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
TextFeatures = Callable[[list[str]], torch.Tensor]


def zero_shot_class_embeddings(text_features: TextFeatures, classnames: Sequence[str],
                               templates: Sequence[str]) -> torch.Tensor:
    """(n_classes, embed_dim) classifier rows: the paper's prompt ensemble, written once.

    Every class name goes through every template (class-major); ``text_features`` maps those prompts, in
    order, to their L2-normalised (n_prompts, embed_dim) features (batched and placed however the caller
    runs its text tower). Each class's prompt embeddings are averaged over templates and renormalised.
    """
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    prompts = [template.format(name) for name in classnames for template in templates]  # class-major
    per_template = text_features(prompts).view(len(classnames), len(templates), -1)  # (C, T, E)
    return F.normalize(per_template.mean(dim=1), dim=-1)  # (C, E)


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
    batches of ``batch_size`` on the device of the model's parameters; the ensemble is
    :func:`zero_shot_class_embeddings`.
    """
    device = next(model.parameters()).device

    def text_features(texts: list[str]) -> torch.Tensor:
        features = []
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[start : start + batch_size]).to(device)
            features.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
        return torch.cat(features)

    return zero_shot_class_embeddings(text_features, classnames, templates).T  # (E, C)


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
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    text_image: torch.Tensor | None = None,
    block_size: int = 1024,
) -> dict[str, float]:
    """Recall@k for image->text and text->image retrieval, with any number of captions per image.

    ``text_image[j]`` is the row of the image that caption ``j`` describes (default: row ``j``, one caption
    per image). As in the paper and CLIP_benchmark, an image is found at k when any of its captions ranks
    in the top k texts, and a caption when its image ranks in the top k images. A match's rank is the
    number of candidates scoring strictly higher, so ties count in the match's favour. Scores are computed
    in blocks of ``block_size`` queries (memory is one block x all candidates, not images x captions).
    Keys: ``image_to_text_R@k`` and ``text_to_image_R@k``.
    """
    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.float(), dim=-1)
    if text_image is None:
        if images.shape[0] != texts.shape[0]:
            raise ValueError("retrieval needs one caption per image (paired rows) unless text_image is given")
        text_image = torch.arange(texts.shape[0])
    text_image = text_image.to(torch.long)
    if text_image.shape[0] != texts.shape[0] or (len(text_image) and int(text_image.max()) >= images.shape[0]):
        raise ValueError("text_image must give, for every caption, the row of an existing image")
    if images.shape[0] and torch.bincount(text_image, minlength=images.shape[0]).min() == 0:
        raise ValueError("every image needs at least one caption")
    image_ranks = torch.empty(images.shape[0], dtype=torch.long)
    for start in range(0, images.shape[0], block_size):
        scores = images[start : start + block_size] @ texts.T  # (B, captions)
        rows = torch.arange(start, start + scores.shape[0])
        own = text_image.view(1, -1) == rows.view(-1, 1)  # (B, captions): this image's captions
        best_own = scores.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values  # (B, 1)
        image_ranks[rows] = (scores > best_own).sum(dim=1)
    text_ranks = torch.empty(texts.shape[0], dtype=torch.long)
    for start in range(0, texts.shape[0], block_size):
        scores = texts[start : start + block_size] @ images.T  # (B, images)
        targets = text_image[start : start + scores.shape[0]].view(-1, 1)
        text_ranks[start : start + scores.shape[0]] = (scores > scores.gather(1, targets)).sum(dim=1)
    results = {}
    for direction, ranks in (("image_to_text", image_ranks), ("text_to_image", text_ranks)):
        for k in ks:
            results[f"{direction}_R@{k}"] = (ranks < k).float().mean().item()
    return results


def imagenet_classes() -> list[tuple[str, str]]:
    """ImageNet-1k as (WordNet id, class name) in class-index order (sorted ids), with the class names
    OpenAI published for the paper's zero-shot evaluation (``imagenet_classes.tsv`` beside this module)."""
    path = Path(__file__).with_name("imagenet_classes.tsv")
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [(wnid, name) for wnid, name in rows]


def classify(model, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(N, n_classes) cosine-similarity logits of a batch of preprocessed images against a classifier."""
    with torch.no_grad():
        features = F.normalize(model.encode_image(images).float(), dim=-1)
    return features @ classifier
