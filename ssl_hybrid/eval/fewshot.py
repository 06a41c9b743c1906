"""k-shot evaluation: seeded k-per-class subsets of the training set, evaluated on the full test set.

Features are extracted once for the whole training set (cached); each (shots, seed) subset selects rows
of it, so 4 shot counts x 5 seeds x 2 methods cost 40 cheap fits, not 40 extractions. Each subset's
sample ids are saved (``<split_dir>/shots<k>_seed<s>.json``) so every reported number can be traced to
its images. Accuracies are top-1; mean ± std over seeds (sample std, ddof=1).

Two protocols (``FEWSHOT_PROTOCOLS``): ``heldout`` draws the shots from the training set and scores every draw on
the same test set; ``rest`` pools train and test, draws the shots from all labeled images and scores each
draw on every image it did not draw. On a small labeled set the fixed test set is the largest noise term:
the quickstart's 111 test images carry a binomial error of ~2.8 points at 10% top-1, which no number of
draws averages away, while ``rest`` scores 185-333 images per draw and a different part of the set each
time (every image is a query in about half of the 5-shot draws).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ssl_hybrid.config import FEWSHOT_METHODS, FEWSHOT_PROTOCOLS, EvalConfig
from ssl_hybrid.data.labeled import LabeledSet, kshot_indices, save_split
from ssl_hybrid.eval.knn import HEADLINE_K, TEMPERATURE, knn_evaluate
from ssl_hybrid.eval.linear import linear_probe

log = logging.getLogger(__name__)

DEFAULT_SHOTS = tuple(EvalConfig().shots)
DEFAULT_METHODS = tuple(EvalConfig().methods)
# Draws evaluated at once (processes); each fit is single-threaded and small (hundreds of rows).
MAX_JOBS = 4


def evaluate_subset(
    method: str,
    features: np.ndarray,
    labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    seed: int,
    knn_k: int = HEADLINE_K,
    temperature: float = TEMPERATURE,
) -> float:
    if method == "knn":
        result = knn_evaluate(
            features,
            labels,
            test_features,
            test_labels,
            ks=(knn_k,),
            headline_k=knn_k,
            temperature=temperature,
            num_classes=num_classes,
        )
    elif method == "linear":
        result = linear_probe(features, labels, test_features, test_labels, seed=seed, num_classes=num_classes)
    else:
        raise ValueError(f"unknown few-shot method '{method}' (choose from {', '.join(FEWSHOT_METHODS)})")
    return result["top1"]


def check_protocol(protocol: str) -> None:
    if protocol not in FEWSHOT_PROTOCOLS:
        raise ValueError(f"unknown few-shot protocol '{protocol}' (one of {', '.join(FEWSHOT_PROTOCOLS)})")


def draw_pool(train: np.ndarray, test: np.ndarray, protocol: str) -> np.ndarray:
    """What the shots are drawn from (features or labels): train, or train then test under ``rest``."""
    return train if protocol == "heldout" else np.concatenate([train, test])


def fewshot_evaluate(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: int = EvalConfig.seeds,
    methods: Sequence[str] = DEFAULT_METHODS,
    train_set: LabeledSet | None = None,
    split_dir: Path | None = None,
    knn_k: int = HEADLINE_K,
    temperature: float = TEMPERATURE,
    num_classes: int | None = None,
    protocol: str = EvalConfig.fewshot_protocol,
    test_set: LabeledSet | None = None,
) -> dict:
    """``{"results": [{"method", "shots", "mean", "std", "n_test", "runs"}], ...}``; runs hold per-seed
    accuracies. ``protocol`` is one of ``FEWSHOT_PROTOCOLS``; with ``rest``, ``test_set`` names the test rows in the
    saved splits (the pool is train then test)."""
    check_protocol(protocol)
    if protocol == "rest" and train_set is not None and test_set is None:
        raise ValueError(
            "few-shot protocol 'rest' draws from train and test: pass test_set too, or the saved "
            "splits could not name the test images drawn"
        )
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    num_classes = num_classes or int(max(train_labels.max(), np.max(test_labels))) + 1
    pool_features = draw_pool(train_features, test_features, protocol)
    pool_labels = draw_pool(train_labels, test_labels, protocol)
    pool_set = train_set if protocol == "heldout" else _pooled(train_set, test_set)
    results: list[dict[str, Any]] = []
    for k in shots:
        subsets = [kshot_indices(pool_labels, k, seed) for seed in range(seeds)]
        split_files = [
            _save(split_dir, pool_set, idx, k, seed, protocol, len(train_labels)) for seed, idx in enumerate(subsets)
        ]
        if protocol == "rest":
            rests = [np.setdiff1d(np.arange(len(pool_labels)), idx) for idx in subsets]
            scored = [(pool_features[rest], pool_labels[rest]) for rest in rests]
        else:
            scored = [(test_features, test_labels)] * len(subsets)
        for method in methods:
            tasks = [
                (method, pool_features[idx], pool_labels[idx], *test, num_classes, seed, knn_k, temperature)
                for seed, (idx, test) in enumerate(zip(subsets, scored))
            ]
            accs = np.array(_run_draws(tasks))
            runs = [
                {
                    "seed": seed,
                    "top1": float(acc),
                    "n_train": int(len(idx)),
                    "n_test": int(len(test[1])),
                    "split": split_file,
                }
                for seed, (acc, idx, test, split_file) in enumerate(zip(accs, subsets, scored, split_files))
            ]
            std = float(accs.std(ddof=1)) if len(accs) > 1 else 0.0
            results.append(
                {
                    "method": method,
                    "shots": int(k),
                    "mean": float(accs.mean()),
                    "std": std,
                    "n_test": runs[0]["n_test"],
                    "runs": runs,
                }
            )
            log.info("%s %d-shot: %.4f ± %.4f over %d seeds", method, k, accs.mean(), std, len(accs))
    n_test = len(test_features) if protocol == "heldout" else min((r["n_test"] for r in results), default=0)
    return {
        "results": results,
        "seeds": seeds,
        "n_test": int(n_test),
        "num_classes": num_classes,
        "knn_k": knn_k,
        "temperature": temperature,
        "metric": "top1",
        "std_ddof": 1,
        "protocol": protocol,
    }


def _run_draws(tasks: list[tuple]) -> list[float]:
    """``evaluate_subset(*task)`` for every draw, several at once: each fit is single-threaded (linear.py), so
    on a 2-core machine two draws at a time halve the wall time of a 10-draw probe. Same results as in turn."""
    from joblib import Parallel, cpu_count, delayed

    jobs = min(MAX_JOBS, cpu_count(only_physical_cores=False), len(tasks))  # honours affinity and cgroups
    if jobs <= 1:
        return [evaluate_subset(*task) for task in tasks]
    return Parallel(n_jobs=jobs)(delayed(evaluate_subset)(*task) for task in tasks)


def _pooled(train_set: LabeledSet | None, test_set: LabeledSet | None) -> LabeledSet | None:
    if train_set is None or test_set is None:
        return None
    source = train_set.source if train_set.source == test_set.source else f"{train_set.source} + {test_set.source}"
    return LabeledSet(
        source, train_set.classes, train_set.samples + test_set.samples, train_set.skipped + test_set.skipped
    )


def _save(
    split_dir: Path | None,
    labeled: LabeledSet | None,
    indices: np.ndarray,
    shots: int,
    seed: int,
    protocol: str = EvalConfig.fewshot_protocol,
    n_train: int = 0,
) -> str | None:
    """The draw's ids; under ``rest`` also which set each came from (two folders may share relative ids)."""
    if split_dir is None or labeled is None:
        return None
    path = Path(split_dir) / f"shots{shots}_seed{seed}.json"
    meta = {"shots": shots, "seed": seed, "protocol": protocol}
    if protocol == "rest":
        meta["from"] = ["train" if i < n_train else "test" for i in indices.tolist()]
    save_split(path, labeled, indices.tolist(), **meta)
    return str(path)
