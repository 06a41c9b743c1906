"""k-shot evaluation: seeded k-per-class subsets of the training set, evaluated on the full test set.

Features are extracted once for the whole training set (cached); each (shots, seed) subset selects rows
of it, so 4 shot counts x 5 seeds x 2 methods cost 40 cheap fits, not 40 extractions. Each subset's
sample ids are saved (``<split_dir>/shots<k>_seed<s>.json``) so every reported number can be traced to
its images. Accuracies are top-1; mean ± std over seeds (sample std, ddof=1).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ssl_hybrid.data.labeled import LabeledSet, kshot_indices, save_split
from ssl_hybrid.eval.knn import HEADLINE_K, TEMPERATURE, knn_evaluate
from ssl_hybrid.eval.linear import linear_probe

log = logging.getLogger(__name__)

METHODS = ("knn", "linear")
DEFAULT_SHOTS = (1, 2, 5, 10)


def evaluate_subset(method: str, features: np.ndarray, labels: np.ndarray, test_features: np.ndarray,
                    test_labels: np.ndarray, num_classes: int, seed: int, knn_k: int = HEADLINE_K,
                    temperature: float = TEMPERATURE) -> float:
    if method == "knn":
        result = knn_evaluate(features, labels, test_features, test_labels, ks=(knn_k,), headline_k=knn_k,
                              temperature=temperature, num_classes=num_classes)
    elif method == "linear":
        result = linear_probe(features, labels, test_features, test_labels, seed=seed, num_classes=num_classes)
    else:
        raise ValueError(f"unknown few-shot method '{method}' (choose from {', '.join(METHODS)})")
    return result["top1"]


def fewshot_evaluate(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                     test_labels: np.ndarray, shots: Sequence[int] = DEFAULT_SHOTS, seeds: int = 5,
                     methods: Sequence[str] = METHODS, train_set: Optional[LabeledSet] = None,
                     split_dir: Optional[Path] = None, knn_k: int = HEADLINE_K,
                     temperature: float = TEMPERATURE, num_classes: Optional[int] = None) -> dict:
    """``{"results": [{"method", "shots", "mean", "std", "runs"}], ...}``; runs hold per-seed accuracies."""
    train_labels = np.asarray(train_labels, dtype=np.int64)
    num_classes = num_classes or int(max(train_labels.max(), np.max(test_labels))) + 1
    results = []
    for k in shots:
        subsets = [kshot_indices(train_labels, k, seed) for seed in range(seeds)]
        split_files = [_save(split_dir, train_set, idx, k, seed) for seed, idx in enumerate(subsets)]
        for method in methods:
            runs = []
            for seed, (idx, split_file) in enumerate(zip(subsets, split_files)):
                acc = evaluate_subset(method, train_features[idx], train_labels[idx], test_features,
                                      test_labels, num_classes, seed, knn_k, temperature)
                runs.append({"seed": seed, "top1": acc, "n_train": int(len(idx)), "split": split_file})
            accs = np.array([r["top1"] for r in runs])
            std = float(accs.std(ddof=1)) if len(accs) > 1 else 0.0
            results.append({"method": method, "shots": int(k), "mean": float(accs.mean()), "std": std,
                            "runs": runs})
            log.info("%s %d-shot: %.4f ± %.4f over %d seeds", method, k, accs.mean(), std, len(accs))
    return {"results": results, "seeds": seeds, "n_test": int(len(test_features)), "num_classes": num_classes,
            "knn_k": knn_k, "temperature": temperature, "metric": "top1", "std_ddof": 1}


def _save(split_dir: Optional[Path], train_set: Optional[LabeledSet], indices: np.ndarray, shots: int,
          seed: int) -> Optional[str]:
    if split_dir is None or train_set is None:
        return None
    path = Path(split_dir) / f"shots{shots}_seed{seed}.json"
    save_split(path, train_set, indices.tolist(), shots=shots, seed=seed)
    return str(path)
