"""Aggregate the 3 seeds of the 224-px family_efficiency runs: mean ± sd per method, paired difference vs ours."""

import json
import statistics
import sys
from pathlib import Path

from scipy import stats

# usage: python aggregate.py OUT.json [SEED_DIR ...]  (default: seed0 seed1 seed2 next to this file)
outs = [Path(p) for p in sys.argv[2:]] or [Path(__file__).parent / f"seed{s}" for s in range(3)]
runs = [json.loads((o / "label_efficiency.json").read_text()) for o in outs]
methods = ["ours", "resvit_keep07", "resvit_adaptive", "resvit_window7", "resvit_topk49"]
names = {
    "ours": "resvit_tiny (ours)",
    "resvit_keep07": "+ token selection, keep 0.7",
    "resvit_adaptive": "+ adaptive compute, share 0.9",
    "resvit_window7": "+ window attention, 7×7",
    "resvit_topk49": "+ top-k attention, k=49",
    "random_resvit_tiny": "random init",
}


def key(m):
    return m if m.startswith("random") else f"{m}_lr0.0015"


summary = {}
rows = []
for m in [*methods, "random_resvit_tiny"]:
    entry = {}
    for metric in ("knn_top1", "linear_10shot"):
        vals = [r["results"][key(m)]["multiscale"][metric] for r in runs]
        base = [r["results"]["ours_lr0.0015"]["multiscale"][metric] for r in runs]
        diffs = [v - b for v, b in zip(vals, base)]
        md, sd = statistics.fmean(diffs), statistics.stdev(diffs)
        half = stats.t.ppf(0.975, len(diffs) - 1) * sd / len(diffs) ** 0.5
        entry[metric] = {
            "by_seed": vals,
            "mean": statistics.fmean(vals),
            "sd": statistics.stdev(vals),
            "vs_ours": {"by_seed": diffs, "mean": md, "ci95": [md - half, md + half]},
        }
    if not m.startswith("random"):
        cpu = [r["pretraining"][key(m)]["cpu_seconds"] for r in runs]
        entry["pretraining_cpu_seconds"] = cpu
    summary[m] = entry
json.dump(
    {
        "seeds": [0, 1, 2],
        "commands": [r["command"] for r in runs],
        "machines": [r["machine"] for r in runs],
        "methods": summary,
    },
    open(sys.argv[1], "w"),
    indent=1,
)
print(
    "| backbone (40 steps, 224 px) | pretraining CPU-s (mean) | k-NN (multi-scale) | vs ours, paired [95% CI] | 10-shot (multi-scale) | vs ours, paired [95% CI] |"
)
print("|---|---|---|---|---|---|")
for m, e in summary.items():
    cpu = f"{statistics.fmean(e['pretraining_cpu_seconds']):.0f}" if "pretraining_cpu_seconds" in e else "—"
    cells = []
    for metric in ("knn_top1", "linear_10shot"):
        x = e[metric]
        v = x["vs_ours"]
        cells.append(f"{x['mean']:.1f} ± {x['sd']:.1f}")
        cells.append("—" if m == "ours" else f"{v['mean']:+.1f} [{v['ci95'][0]:+.1f}, {v['ci95'][1]:+.1f}]")
    print(f"| {names[m]} | {cpu} | " + " | ".join(cells) + " |")
