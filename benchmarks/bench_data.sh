#!/usr/bin/env bash
# Data-stream throughput: full shard stream vs decode+augment from memory, 1 and 2 workers, side by side.
# Writes benchmarks/results/data.json (about 1-2 minutes on the embedded corpus on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec ssl-hybrid bench data --out benchmarks/results/data.json "$@"
