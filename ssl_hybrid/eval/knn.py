"""Weighted k-NN classification on frozen features, DINO's protocol (``eval_knn.py``).

Bank and queries are L2-normalized float32; neighbours come from an exact ``faiss.IndexFlatIP`` search
(cosine similarity); each neighbour votes for its class with weight exp(sim / T), T = 0.07. One search
at the largest k serves every k in {10, 20, 100, 200}: the top-k of a top-200 result are its first k
columns (faiss returns neighbours sorted by similarity). k = 20 is the headline number.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from ssl_hybrid.config import KNN_REPORTED_KS, EvalConfig

log = logging.getLogger(__name__)

# The protocol's defaults live in the config (eval.knn_k, eval.knn_temperature); named here for callers.
DEFAULT_KS = KNN_REPORTED_KS
HEADLINE_K = EvalConfig.knn_k
TEMPERATURE = EvalConfig.knn_temperature


def set_faiss_threads(threads: int | None = None) -> int:
    """faiss and torch both use OpenMP; an explicit count keeps them from oversubscribing the cores."""
    import faiss

    threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    return threads


@contextlib.contextmanager
def faiss_threads(threads: int | None = None) -> Iterator[int]:
    """``set_faiss_threads`` for the duration of a search, then the previous counts again. When torch is
    imported first, faiss's ``omp_set_num_threads`` lands in torch's OpenMP runtime and would silently
    change ``torch.get_num_threads()`` for the rest of the process (a trainer whose k-NN monitor ran at
    step 0 would train on 1 thread, and its resumed run on all of them: different float sums)."""
    import faiss
    import torch

    before_faiss, before_torch = faiss.omp_get_max_threads(), torch.get_num_threads()
    try:
        yield set_faiss_threads(threads)
    finally:
        faiss.omp_set_num_threads(before_faiss)
        torch.set_num_threads(before_torch)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """A float32, C-contiguous, unit-norm copy (zero rows stay zero); faiss's multithreaded kernel."""
    import faiss

    x = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


def search(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of normalized features: (similarities [Q, k], bank indices [Q, k])."""
    import faiss

    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(bank)
    return index.search(queries, k)


def vote(
    similarities: np.ndarray, neighbor_labels: np.ndarray, num_classes: int, temperature: float = TEMPERATURE
) -> np.ndarray:
    """Class scores [Q, classes]: sum over neighbours of exp(sim / T) for the neighbour's class."""
    q, k = similarities.shape
    weights = np.exp(similarities.astype(np.float64) / temperature)  # [Q, k]
    # One bincount over (query, class) cells: a scatter-add without a Python loop or a [Q, k, C] one-hot.
    cells = (np.arange(q)[:, None] * num_classes + neighbor_labels).ravel()
    return np.bincount(cells, weights=weights.ravel(), minlength=q * num_classes).reshape(q, num_classes)


def knn_predict(
    bank: np.ndarray,
    bank_labels: np.ndarray,
    queries: np.ndarray,
    k: int = HEADLINE_K,
    temperature: float = TEMPERATURE,
    num_classes: int | None = None,
) -> np.ndarray:
    """Weighted k-NN class scores [Q, classes] (argmax = prediction)."""
    bank_labels = np.asarray(bank_labels, dtype=np.int64)
    num_classes = num_classes or int(bank_labels.max()) + 1
    k = min(k, len(bank))
    similarities, indices = search(l2_normalize(bank), l2_normalize(queries), k)
    return vote(similarities, bank_labels[indices], num_classes, temperature)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the k highest scores (ties broken by lower class index).

    The true label's rank is counted directly (classes scoring higher, plus equal-scoring classes with a
    lower index) rather than sorting every row: one O(Q x classes) pass for any k.
    """
    labels = np.asarray(labels)
    true = scores[np.arange(len(scores)), labels][:, None]  # [Q, 1]
    columns = np.arange(scores.shape[1])[None, :]
    rank = (scores > true).sum(1) + ((scores == true) & (columns < labels[:, None])).sum(1)
    return float((rank < k).mean())


def knn_evaluate(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    ks: Iterable[int] = DEFAULT_KS,
    temperature: float = TEMPERATURE,
    headline_k: int = HEADLINE_K,
    num_classes: int | None = None,
    threads: int | None = None,
) -> dict:
    """The k-NN evaluation JSON: headline top1/top5 at ``headline_k`` plus every k in ``per_k``.

    k larger than the bank is capped at the bank size (recorded in ``per_k`` under the requested k).
    """
    start = time.perf_counter()
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    ks = sorted(set(int(k) for k in ks) | {headline_k})
    k_max = min(max(ks), len(train_features))
    with faiss_threads(threads):
        similarities, indices = search(l2_normalize(train_features), l2_normalize(test_features), k_max)
    neighbor_labels = train_labels[indices]  # [Q, k_max]
    per_k = {}
    for k in ks:
        used = min(k, k_max)
        scores = vote(similarities[:, :used], neighbor_labels[:, :used], num_classes, temperature)
        per_k[str(k)] = {
            "top1": topk_accuracy(scores, test_labels, 1),
            "top5": topk_accuracy(scores, test_labels, 5),
            "k_used": used,
        }
    seconds = time.perf_counter() - start
    headline = per_k[str(headline_k)]
    return {
        "top1": headline["top1"],
        "top5": headline["top5"],
        "k": headline_k,
        "temperature": temperature,
        "n_train": int(len(train_features)),
        "n_test": int(len(test_features)),
        "seconds": seconds,
        "per_k": per_k,
    }


def leave_one_out_knn(
    features: np.ndarray, labels: np.ndarray, k: int = HEADLINE_K, temperature: float = TEMPERATURE
) -> dict[str, Any]:
    """Top-1/top-5 of each row classified by its k most similar *other* rows (cosine, exp(sim/T) votes).

    Every image is a query and the other N-1 are its bank: on a small labeled set this uses all N labels as
    queries, where a held-out split scores only its test part (the online monitor and the quickstart's
    table use it; ``n_test`` is N and ``n_train`` the bank size N-1)."""
    n = len(features)
    k = min(k, n - 1)
    similarities, indices = search(l2_normalize(features), l2_normalize(features), k + 1)  # [N, k+1]
    not_self = indices != np.arange(n)[:, None]
    keep = np.argsort(~not_self, axis=1, kind="stable")[:, :k]  # the first k neighbours that are not the query
    similarities = np.take_along_axis(similarities, keep, axis=1)
    neighbours = np.take_along_axis(indices, keep, axis=1)
    num_classes = int(labels.max()) + 1
    scores = vote(similarities, labels[neighbours], num_classes, temperature)
    return {
        "top1": topk_accuracy(scores, labels, 1),
        "top5": topk_accuracy(scores, labels, 5),
        "k": k,
        "temperature": temperature,
        "n_test": n,
        "n_train": n - 1,
        "num_classes": num_classes,
        "protocol": "leave_one_out",
    }
