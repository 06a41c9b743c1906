#!/usr/bin/env bash
# GPU check (issue 16): what only a GPU can show, in one run of under 8 minutes on one GPU
# (bf16 throughput + FLOP utilization, masked ratio, fp16 GradScaler recovery, autocast feature extraction,
# 4 minutes of pretraining with k-NN / 5-shot vs random init, channels_last and torch.compile).
#   bash benchmarks/gpu_check.sh            # on the GPU: benchmarks/results/gpu/gpu_check.{json,md}
#   bash benchmarks/gpu_check.sh --smoke    # every section for a few iterations on the CPU
#   bash benchmarks/gpu_check.sh --help     # options (sections, budget, data, output folder)
# Needs `pip install -e .` first. Runs the checkout's code (PYTHONPATH), whatever is installed.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
python3 benchmarks/gpu_check.py "$@"
rc=$?
if [ "$rc" -gt 128 ]; then
    # Killed by a signal (a segfault in a CUDA library, say): the JSON holds every finished section and marks
    # the one that was running; run the remaining ones once.
    echo "gpu_check: the process died (exit $rc); resuming with the sections not yet run" >&2
    python3 benchmarks/gpu_check.py --resume "$@"
    rc=$?
fi
exit "$rc"
