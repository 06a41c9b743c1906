"""``python benchmarks/bench_eval.py``: the whole k-NN evaluation against its limits, measured side by side.

At 50k bank x 10k queries x 384 dims (``--scale`` shrinks bank and queries together):

- ``matmul_peak``: the same-size float32 GEMM (queries @ bank.T, in query chunks so the [Q, N] result
  stays small) — what any exact search must at least pay;
- ``faiss_search``: bare ``IndexFlatIP.search`` at k=200 on pre-normalized data (what we call);
- ``knn_evaluate``: our whole evaluation (normalize, search, voting at k = 10/20/100/200, accuracies);
- ``faiss_search_k20`` / ``knn_evaluate_k20``: the same two when only the headline k=20 is wanted;
- ``evaluation_overhead``: what knn_evaluate adds to the search, timed alone (load-robust);
- ``torch_chunked``: torch matmul + topk(20) per query chunk, then the same voting;
- ``sklearn_brute``: ``KNeighborsClassifier(algorithm="brute")`` at k=20 with the same exp(sim/T)
  weights, euclidean on unit vectors (sklearn's fastest, GEMM-based path) and ``metric="cosine"``.

Same thread count for all. The machine's load average is recorded: on a shared machine absolute times move,
ratios less so. The JSON holds measurements only: the targets they are judged against are in the README's
benchmark table.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from timing import time_alternating

from ssl_hybrid.eval.knn import (
    DEFAULT_KS,
    HEADLINE_K,
    TEMPERATURE,
    knn_evaluate,
    l2_normalize,
    search,
    set_faiss_threads,
    topk_accuracy,
    vote,
)
from ssl_hybrid.machine import machine_info

FULL_BANK, FULL_QUERIES, DIM = 50_000, 10_000, 384
QUERY_CHUNK = 1024  # rows of the [chunk, N] similarity block: 1024 x 50k x 4 B = 200 MB


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", type=float, default=1.0,
                        help="shrink bank and queries (0.1 = 5k x 1k x 384) for a quick run")
    parser.add_argument("--dim", type=int, default=DIM, help="feature dimension")
    parser.add_argument("--classes", type=int, default=100, help="number of classes of the synthetic labels")
    parser.add_argument("--threads", type=int, default=0, help="threads for faiss/torch/BLAS; 0 = all cores")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds; each times every variant once, back to back (the best time is kept)")
    parser.add_argument("--skip-sklearn", action="store_true", help="leave out the (slow) scikit-learn variant")


def _synthetic(n_bank: int, n_query: int, dim: int, classes: int, seed: int = 0):
    """Clustered features (class centre + noise) so accuracies are meaningful and predictions comparable."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    bank_labels = rng.integers(0, classes, n_bank)
    query_labels = rng.integers(0, classes, n_query)
    bank = centres[bank_labels] + 2.0 * rng.standard_normal((n_bank, dim), dtype=np.float32)
    queries = centres[query_labels] + 2.0 * rng.standard_normal((n_query, dim), dtype=np.float32)
    return bank, bank_labels, queries, query_labels


def _matmul_peak(bank: np.ndarray, queries: np.ndarray) -> None:
    import torch

    bank_t = torch.from_numpy(bank)
    for start in range(0, len(queries), QUERY_CHUNK):
        torch.from_numpy(queries[start:start + QUERY_CHUNK]) @ bank_t.T  # [chunk, N]


def _torch_chunked(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, k: int, classes: int):
    import torch

    bank_t = torch.nn.functional.normalize(torch.from_numpy(bank), dim=1)
    queries_t = torch.nn.functional.normalize(torch.from_numpy(queries), dim=1)
    sims, idx = [], []
    for start in range(0, len(queries_t), QUERY_CHUNK):
        values, indices = (queries_t[start:start + QUERY_CHUNK] @ bank_t.T).topk(k, dim=1)  # [chunk, k]
        sims.append(values)
        idx.append(indices)
    sims_np, idx_np = torch.cat(sims).numpy(), torch.cat(idx).numpy()
    return vote(sims_np, bank_labels[idx_np], classes).argmax(1)


def _sklearn_brute(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, k: int, metric: str = "euclidean"):
    """scikit-learn's brute-force k-NN with DINO's votes.

    ``euclidean`` on unit vectors is sklearn's fastest path (its GEMM-based ArgKmin reduction);
    ``cosine`` is what a user would naturally write for cosine k-NN (pairwise-distance chunks).
    """
    from sklearn.neighbors import KNeighborsClassifier

    def weights(distances: np.ndarray) -> np.ndarray:
        # Unit vectors: cosine similarity = 1 - d^2 / 2 (euclidean) or 1 - d (cosine): DINO's exp(sim / T).
        sims = 1.0 - distances if metric == "cosine" else 1.0 - distances ** 2 / 2.0
        return np.exp(sims / TEMPERATURE)

    classifier = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric=metric, weights=weights)
    classifier.fit(l2_normalize(bank), bank_labels)
    return classifier.predict(l2_normalize(queries))


def run_benchmark(args: argparse.Namespace) -> dict:
    import sklearn.neighbors
    import torch
    from threadpoolctl import threadpool_limits

    threads = args.threads or os.cpu_count() or 1
    set_faiss_threads(threads)
    torch.set_num_threads(threads)
    n_bank, n_query = max(200, int(FULL_BANK * args.scale)), max(50, int(FULL_QUERIES * args.scale))
    bank, bank_labels, queries, query_labels = _synthetic(n_bank, n_query, args.dim, args.classes)
    k_max = max(DEFAULT_KS)
    bank_n, queries_n = l2_normalize(bank), l2_normalize(queries)
    variants: dict[str, Callable[[], object]] = {
        "matmul_peak": lambda: _matmul_peak(bank_n, queries_n),
        "faiss_search": lambda: search(bank_n, queries_n, k_max),
        "knn_evaluate": lambda: knn_evaluate(bank, bank_labels, queries, query_labels, threads=threads),
        # Headline-only variants: the same comparison when only k=20 is wanted (as sklearn computes).
        "faiss_search_k20": lambda: search(bank_n, queries_n, HEADLINE_K),
        "knn_evaluate_k20": lambda: knn_evaluate(bank, bank_labels, queries, query_labels, ks=(HEADLINE_K,),
                                                 threads=threads),
        "torch_chunked": lambda: _torch_chunked(bank, bank_labels, queries, HEADLINE_K, args.classes),
    }
    if not args.skip_sklearn:
        variants["sklearn_brute"] = lambda: _sklearn_brute(bank, bank_labels, queries, HEADLINE_K)
        variants["sklearn_brute_cosine"] = lambda: _sklearn_brute(bank, bank_labels, queries, HEADLINE_K, "cosine")
    outputs: dict[str, Any] = {}
    with threadpool_limits(limits=threads):
        rounds = {name: t["wall"] for name, t in time_alternating(variants, max(1, args.repeats), 0, outputs).items()}
    timings = {name: min(times) for name, times in rounds.items()}
    # What knn_evaluate adds to the search, timed alone on the search's own output: a load-robust check
    # of the overhead (the two end-to-end numbers above differ by less than the load's noise).
    sims, idx = outputs["faiss_search"]
    overhead = lambda: _evaluation_overhead(bank, queries, sims, bank_labels[idx], query_labels, args.classes)
    with threadpool_limits(limits=threads):
        timings["evaluation_overhead"] = min(time_alternating({"overhead": overhead}, max(1, args.repeats))["overhead"]["wall"])
    ours_pred = vote(*_top(bank_n, bank_labels, queries_n), args.classes).argmax(1)
    result = outputs["knn_evaluate"]
    checks = {f"{name}_agreement_k20": float((outputs[variant] == ours_pred).mean())
              for name, variant in (("torch", "torch_chunked"), ("sklearn", "sklearn_brute"),
                                    ("sklearn_cosine", "sklearn_brute_cosine")) if variant in outputs}
    flops = 2.0 * n_bank * n_query * args.dim
    ratios = {"knn_evaluate_over_faiss_search": timings["knn_evaluate"] / timings["faiss_search"],
              "knn_evaluate_k20_over_faiss_search_k20": timings["knn_evaluate_k20"] / timings["faiss_search_k20"],
              "overhead_over_faiss_search": timings["evaluation_overhead"] / timings["faiss_search"],
              "faiss_search_over_matmul_peak": timings["faiss_search"] / timings["matmul_peak"],
              "torch_chunked_k20_over_knn_evaluate_k20": timings["torch_chunked"] / timings["knn_evaluate_k20"]}
    if "sklearn_brute" in timings:
        # sklearn computes k=20 only, so it is compared with our k=20 evaluation.
        ratios["sklearn_over_knn_evaluate_k20"] = timings["sklearn_brute"] / timings["knn_evaluate_k20"]
        ratios["sklearn_cosine_over_knn_evaluate_k20"] = timings["sklearn_brute_cosine"] / timings["knn_evaluate_k20"]
        ratios["sklearn_over_knn_evaluate"] = timings["sklearn_brute"] / timings["knn_evaluate"]
    return {
        "benchmark": "knn",
        "shape": {"bank": n_bank, "queries": n_query, "dim": args.dim, "classes": args.classes, "k_search": k_max},
        "seconds": timings, "seconds_per_round": rounds, "ratios": ratios,
        "matmul_gflops": flops / timings["matmul_peak"] / 1e9,
        "checks": checks, "knn_top1_k20": result["top1"],
        "command": f"python benchmarks/bench_eval.py --scale {args.scale} --threads {args.threads} --repeats {args.repeats}",
        # threads: the one count every variant ran at; sklearn's version because its two metrics' speeds swap
        # between releases (euclidean was 2.8x faster than cosine in one, 1.6x slower in 1.9.1)
        "machine": machine_info(packages=("numpy", "faiss", "sklearn") if "sklearn_brute" in timings
                                else ("numpy", "faiss")),
    }


def _evaluation_overhead(bank, queries, sims, neighbor_labels, query_labels, classes: int) -> None:
    """Everything knn_evaluate does besides the search: normalize both sets, vote and score every k."""
    l2_normalize(bank), l2_normalize(queries)
    for k in DEFAULT_KS:
        scores = vote(sims[:, :k], neighbor_labels[:, :k], classes)
        topk_accuracy(scores, query_labels, 1), topk_accuracy(scores, query_labels, 5)


def _top(bank_n: np.ndarray, bank_labels: np.ndarray, queries_n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sims, idx = search(bank_n, queries_n, HEADLINE_K)
    return sims, bank_labels[idx]


if __name__ == "__main__":
    import sys

    import timing

    timing.main(sys.modules[__name__])
