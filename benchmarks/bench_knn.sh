#!/usr/bin/env bash
# k-NN evaluation benchmark (issue 7): the whole evaluation vs bare FAISS search vs a same-size GEMM,
# torch chunked matmul+topk and scikit-learn brute force, measured side by side in one run.
# Full size is 50k bank x 10k queries x 384 dims; pass e.g. --scale 0.1 for a quick run.
# Targets: knn_evaluate <= 1.25x faiss_search, >= 5x faster than scikit-learn.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 benchmarks/bench_eval.py --out benchmarks/results/knn.json "$@"
