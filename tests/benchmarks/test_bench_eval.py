"""The k-NN benchmark (benchmarks/bench_eval.py) at a tiny scale: every variant timed, predictions agree, ratios reported."""

from __future__ import annotations

import argparse

import pytest


def test_bench_knn_options_parse():
    import bench_eval

    parser = argparse.ArgumentParser()
    bench_eval.add_arguments(parser)
    args = parser.parse_args(["--scale", "0.01", "--skip-sklearn"])
    assert args.scale == 0.01 and args.skip_sklearn


@pytest.mark.slow
def test_bench_knn_small_scale_reports_ratios_and_agreement():
    from bench_eval import run_benchmark

    args = argparse.Namespace(scale=0.02, dim=64, classes=10, threads=1, repeats=1, skip_sklearn=False)
    result = run_benchmark(args)
    assert result["shape"] == {"bank": 1000, "queries": 200, "dim": 64, "classes": 10, "k_search": 200}
    assert set(result["seconds"]) == {"matmul_peak", "faiss_search", "knn_evaluate", "faiss_search_k20",
                                      "knn_evaluate_k20", "torch_chunked", "sklearn_brute", "sklearn_brute_cosine",
                                      "evaluation_overhead"}
    assert all(v > 0 for v in result["seconds"].values())
    assert result["checks"]["sklearn_agreement_k20"] == 1.0
    assert result["checks"]["torch_agreement_k20"] == 1.0
    assert result["checks"]["sklearn_cosine_agreement_k20"] == 1.0
    assert set(result["ratios"]) >= {"knn_evaluate_over_faiss_search", "sklearn_over_knn_evaluate_k20"}
    assert result["machine"]["cpu_count"] >= 1 and "torch" in result["machine"]
    assert not [key for key in result if "target" in key or key.endswith(("_met", "_ok"))]  # targets: README
