#!/usr/bin/env bash
# Probe an objective setting on the quickstart recipe (pets37, 64 px, 200 steps, online k-NN every 40 steps):
# runs `ssl-hybrid pretrain -c recipes/quickstart.yaml` with the given overrides on 1 thread (two probes can
# share a 2-core machine) and prints the online k-NN top-1 (%) at steps 0, 40, ..., 200 and the last losses.
#   benchmarks/quickstart_probe.sh NAME [key=value ...]
# Results are appended to runs/quickstart_probe/results.jsonl.
set -euo pipefail
name=${1:?usage: quickstart_probe.sh NAME [key=value ...]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/runs/quickstart_probe
mkdir -p "$out"
rm -rf "${out:?}/$name"  # a run directory left from an earlier probe would be resumed, not retrained
cd "$root"
if ! OMP_NUM_THREADS=1 ssl-hybrid pretrain -c recipes/quickstart.yaml "name=$name" "train.output_dir=$out" \
    data.num_workers=1 "$@" > "$out/$name.log" 2>&1; then
    tail -n 5 "$out/$name.log" >&2
    exit 1
fi
python - "$out" "$name" "$*" <<'PY'
import json, sys
out, name, overrides = sys.argv[1:]
rows = [json.loads(line) for line in open(f"{out}/{name}/metrics.jsonl")]
knn = [round(100 * r["knn_top1"], 1) for r in rows if "knn_top1" in r]
last = [r for r in rows if "loss" in r][-1]
result = {"name": name, "overrides": overrides, "knn_top1": knn,
          "last": {k: round(v, 3) for k, v in last.items() if k in ("mim", "dino", "simclr", "embedding_std")}}
print(json.dumps(result))
with open(f"{out}/results.jsonl", "a") as f:
    f.write(json.dumps(result) + "\n")
PY
