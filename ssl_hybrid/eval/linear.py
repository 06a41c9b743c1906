"""Linear probe on cached frozen features: multinomial logistic regression (scikit-learn, L-BFGS).

Why scikit-learn rather than a torch probe: the probe's problem is convex, so an exact solver gives the
same answer every time with no learning rate, epochs or batch size to tune — the only knob left is the
L2 strength C, which we choose on a held-out part of the training set and then refit on all of it. At
few-label sizes (hundreds to tens of thousands of rows on cached features) L-BFGS takes seconds on CPU.
A torch SGD probe would only pay off at ImageNet scale, which this evaluator does not target.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence

import numpy as np

from ssl_hybrid.config import EvalConfig
from ssl_hybrid.data.labeled import stratified_holdout
from ssl_hybrid.eval.knn import topk_accuracy

log = logging.getLogger(__name__)

# Inverse L2 strengths tried on the held-out split: 1e-3 (heavily regularized) .. 1e3 (nearly none).
DEFAULT_CS = tuple(float(c) for c in np.logspace(-3, 3, 7))
# With one labeled sample per class nothing can be held out; C=1 is scikit-learn's own default.
FALLBACK_C = 1.0
HOLDOUT_FRACTION = EvalConfig.linear_holdout
MAX_ITER = 1000
# Feature matrices smaller than this (elements) are fit single-threaded.
SINGLE_THREAD_BELOW = 5_000_000


def _fit(features: np.ndarray, labels: np.ndarray, c: float):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # Standardizing makes one C grid fit every backbone, whatever the scale of its features.
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=MAX_ITER))
    from threadpoolctl import threadpool_limits

    # Few-label fits are tiny (hundreds of rows): BLAS threads only add sync cost, 10-20x under CPU load
    # (measured: 148 x 192, 37 classes: 0.05 s single-threaded vs 0.5-1.8 s with default threads).
    small = features.size < SINGLE_THREAD_BELOW
    with warnings.catch_warnings(), threadpool_limits(limits=1 if small else None):
        warnings.simplefilter("ignore", ConvergenceWarning)  # a near-converged probe is still a fine probe
        # k-shot fits have one sample per class at k=1: sklearn then suspects a regression target.
        warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
        model.fit(features, labels)
    return model


def _scores(model, features: np.ndarray, num_classes: int) -> np.ndarray:
    """Class probabilities as [N, num_classes], also when some classes were absent from the fit."""
    probs = model.predict_proba(features)
    full = np.zeros((len(features), num_classes))
    full[:, model.classes_] = probs
    return full


def choose_c(
    features: np.ndarray,
    labels: np.ndarray,
    cs: Sequence[float] = DEFAULT_CS,
    holdout: float = HOLDOUT_FRACTION,
    seed: int = 0,
) -> tuple[float, dict[str, float], str]:
    """(chosen C, held-out accuracy per C, how it was chosen). Ties go to the stronger regularization."""
    fit_idx, held_idx = stratified_holdout(labels, holdout, seed)
    if len(held_idx) == 0 or len(np.unique(labels[fit_idx])) < 2:
        return FALLBACK_C, {}, "default (too few samples per class to hold any out)"
    accuracy = {}
    for c in sorted(cs):
        model = _fit(features[fit_idx], labels[fit_idx], c)
        accuracy[repr(c)] = float((model.predict(features[held_idx]) == labels[held_idx]).mean())
    best = max(accuracy.values())
    chosen = min(float(c) for c, acc in accuracy.items() if acc == best)
    return chosen, accuracy, f"held-out {len(held_idx)} of {len(labels)} training samples"


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    cs: Sequence[float] = DEFAULT_CS,
    holdout: float = HOLDOUT_FRACTION,
    seed: int = 0,
    num_classes: int | None = None,
) -> dict:
    """Choose C on a held-out part of train, refit on all of train, report test top-1/top-5 and C."""
    start = time.perf_counter()
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    chosen, val_accuracy, selection = choose_c(train_features, train_labels, cs, holdout, seed)
    model = _fit(train_features, train_labels, chosen)
    scores = _scores(model, test_features, num_classes)
    return {
        "top1": topk_accuracy(scores, test_labels, 1),
        "top5": topk_accuracy(scores, test_labels, 5),
        "C": chosen,
        "selection": selection,
        "val_accuracy": val_accuracy,
        "n_train": int(len(train_features)),
        "n_test": int(len(test_features)),
        "seconds": time.perf_counter() - start,
    }
