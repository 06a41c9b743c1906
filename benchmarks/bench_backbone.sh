#!/usr/bin/env bash
# Backbone benchmark (issue 5), CPU fp32, 224 px, batch 16, measured side by side in one run:
#   * train step (fwd + CE + bwd + AdamW) img/s, GFLOPs/img and FLOP/s / GEMM peak for hybrid_* and timm
#     vit_tiny/small, resnet18/50, convnext_atto (GEMM timed in alternation with each model's steps);
#   * hybrid_small encoder step with 75% masking vs unmasked;
#   * hybrid_small inference with token selection (fixed 0.7 at 3 blocks, adaptive) vs none.
# Targets: masked >= 2.5x, hybrid_small utilization >= 0.5, fixed selection >= 1.4x.
# About 10-20 minutes on 2 shared cores; trim with e.g. --models hybrid_small,vit_small_patch16_224 --iters 2
# or --sections masked,selection.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec python3 benchmarks/bench_models.py --out benchmarks/results/backbone.json "$@"
