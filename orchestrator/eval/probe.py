"""The paper's linear probe: L2-regularised logistic regression on frozen image features.

Section 3.2 / appendix A.3 of the paper: scikit-learn's L-BFGS logistic regression (at most 1,000
iterations), the regularisation strength chosen on a validation split by a parametric search that
starts at 10^-6, 10^-4, ..., 10^6 and halves the interval around the best value until it reaches 8 steps
per decade; then the model is refit on train + validation and scored on the test split. scikit-learn's
``C`` is the inverse regularisation strength, so the sweep runs over C on the same log grid.
Features are the L2-normalised embeddings the zero-shot classifier also uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sklearn.linear_model import LogisticRegression

COARSE_LOG10_C = (-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0)
FINEST_STEP = 1.0 / 8.0  # 8 steps per decade, the paper's resolution
MAX_ITER = 1000


@dataclass
class ProbeResult:
    top1: float
    best_c: float
    validation_top1: float
    sweep: dict[float, float]
    """log10(C) -> validation top-1 for every C tried."""
    per_class: np.ndarray
    """(classes,) test accuracy per class (NaN for a class without test samples)."""
    train_samples: int
    validation_samples: int
    test_samples: int


def _fit(c_log10: float, features: np.ndarray, labels: np.ndarray, seed: int) -> LogisticRegression:
    from sklearn.linear_model import LogisticRegression  # scikit-learn loads where a probe runs (~1 s)

    model = LogisticRegression(C=10.0 ** c_log10, max_iter=MAX_ITER, solver="lbfgs", random_state=seed)
    return model.fit(features, labels)  # an extreme C may stop at max_iter (noise.py): its validation score counts


def search_c(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
             *, seed: int = 0) -> dict[float, float]:
    """Validation top-1 by log10(C): the coarse grid, then halving the interval around the best."""
    scores: dict[float, float] = {}

    def score(c_log10: float) -> float:
        if c_log10 not in scores:
            scores[c_log10] = float(_fit(c_log10, train_x, train_y, seed).score(val_x, val_y))
        return scores[c_log10]

    for c_log10 in COARSE_LOG10_C:
        score(c_log10)
    step = COARSE_LOG10_C[1] - COARSE_LOG10_C[0]
    while step > FINEST_STEP:
        step /= 2
        best = max(scores, key=lambda c: (scores[c], -abs(c)))  # ties: the value nearer C = 1
        for neighbour in (best - step, best + step):
            if COARSE_LOG10_C[0] <= neighbour <= COARSE_LOG10_C[-1]:
                score(neighbour)
    return scores


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 classes: int, validation_fraction: float = 0.2, seed: int = 0) -> ProbeResult:
    """C chosen on a validation split carved (stratified where possible) from train, refit on all of train,
    top-1 on test."""
    if len(np.unique(train_y)) < 2:
        raise ValueError("the linear probe needs at least two classes in the training split")
    counts = np.bincount(train_y)
    classes_present = int((counts > 0).sum())
    validation = math.ceil(validation_fraction * len(train_y))
    # A stratified split needs two samples of every class and room for every class on both sides.
    stratify = (train_y if counts[counts > 0].min() >= 2 and classes_present <= min(validation, len(train_y) - validation)
                else None)
    from sklearn.model_selection import train_test_split

    fit_x, val_x, fit_y, val_y = train_test_split(train_x, train_y, test_size=validation_fraction,
                                                  random_state=seed, stratify=stratify)
    sweep = search_c(fit_x, fit_y, val_x, val_y, seed=seed)
    best = max(sweep, key=lambda c: (sweep[c], -abs(c)))
    model = _fit(best, train_x, train_y, seed)
    predicted = model.predict(test_x)
    hits = predicted == test_y
    support = np.bincount(test_y, minlength=classes)
    per_class = np.divide(np.bincount(test_y, weights=hits, minlength=classes), support,
                          out=np.full(classes, np.nan), where=support > 0)
    return ProbeResult(float(hits.mean()), 10.0 ** best, sweep[best], sweep, per_class,
                       len(fit_x), len(val_x), len(test_x))
