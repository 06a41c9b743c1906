"""Ablation table from the label-efficiency JSONs written by ``benchmarks/ablation.sh``.

Each row switches one lever of the small-budget design off ("ours" has them all on); the pooling lever is read
from the same runs evaluated with default pooling. Writes ``benchmarks/results/ablation/README.md``.

    python benchmarks/ablation_table.py [--results benchmarks/results/ablation]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# method -> (lever switched off, what the row runs instead of ours)
ROWS = {
    "ours": ("none: all levers on", "resvit_tiny, SimCLR on the multi-scale embedding, transformer lr x0.3"),
    "resvit_pooled_embed": ("training embedding", "SimCLR head on the pooled feature instead of the multi-scale embedding"),
    "resvit_one_lr": ("lr per part", "one lr for conv stages and ViT blocks"),
    "hybrid_tiny_simclr": ("architecture", "hybrid_tiny (light conv stem, 12 ViT blocks) instead of resvit_tiny"),
    "resvit_cj05": ("(lever on) colour jitter 0.5", "lightly's colour jitter at half strength"),
    "resvit_dino": ("objective", "DINO (fast teacher, 256 prototypes) instead of SimCLR"),
    "resvit_multicrop": ("(lever on) multi-crop", "+ 4 local crops of half the image size, NT-Xent to both global views"),
    "resnet18_ms_embed": ("architecture, same embedding", "ResNet-18 SimCLR on its multi-scale embedding"),
    "simclr_resnet18": ("baseline", "ResNet-18 SimCLR (lightly recipe), same lr and pooling treatment"),
}
# Runs made before "ours" took the multi-scale embedding (their JSON has the lever "resvit_ms_embed"): there
# "ours" was SimCLR on the pooled feature.
LEGACY_ROWS = {
    "ours": ("none: the earlier ours", "resvit_tiny, SimCLR on the pooled feature, transformer lr x0.3"),
    "resvit_simclr_one_lr": ("lr per part", "one lr, SimCLR head on the pooled feature"),
    "hybrid_tiny_simclr": ("architecture", "hybrid_tiny, SimCLR on the pooled feature"),
    "resvit_dino": ROWS["resvit_dino"],
    "resvit_ms_embed": ("(lever on) training embedding = today's ours", "SimCLR head on the multi-scale embedding"),
    "simclr_resnet18": ROWS["simclr_resnet18"],
}


def rows_for(result: dict) -> dict:
    return LEGACY_ROWS if "resvit_ms_embed" in result["methods"] else ROWS


def loss_cell(run: dict) -> str:
    losses = run.get("last_losses", {})
    terms = ", ".join(f"{k} {v:.2f}" for k, v in losses.items() if k != "embedding_std")
    cell = f"{terms} ({losses['embedding_std']:.2f})" if "embedding_std" in losses else terms
    if "dino" in losses:
        below = run.get("dino_below_uniform_step")
        cell += f"; below ln K from step {below}" if below is not None else "; never below ln K"
    return cell


def dataset_table(result: dict) -> list[str]:
    shots = [key for key in next(iter(result["results"].values()))["multiscale"] if key.startswith("linear_")]
    cols = ["knn_top1", *shots]
    head = ["lever off", "run", "steps", "last loss (embedding std)",
            *(f"{c} multiscale" for c in cols), *(f"{c} default pooling" for c in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, run in result["pretraining"].items():
        lever, what = rows_for(result).get(run["method"], (run["method"], run["method"]))
        cells = [f"{result['results'][key][p][c]:.1f}" for p in ("multiscale", "default") for c in cols]
        lines.append("| " + " | ".join([lever, what, str(run["step"]), loss_cell(run), *cells]) + " |")
    for key, row in result["results"].items():
        if key.startswith("random_"):
            cells = [f"{row[p][c]:.1f}" for p in ("multiscale", "default") for c in cols]
            lines.append("| " + " | ".join(["pretraining", key.replace("random_", "") + " random init", "0", "–",
                                            *cells]) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "ablation")
    args = parser.parse_args()
    out = ["# Ablation: which lever buys what (4 CPU-minutes of pretraining per run)", "",
           "Made by `bash benchmarks/ablation.sh` then `python benchmarks/ablation_table.py`. Each row switches one "
           "lever of ours off; the pooling lever is the difference between the multiscale and default-pooling "
           "columns of the same run. All runs at one lr (the middle of the label-efficiency grid); k-NN top-1 (k=20) and k-shot linear "
           "probes (mean over seeded splits), in %.", ""]
    for path in sorted(args.results.glob("*/label_efficiency.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        out += [f"## {path.parent.name}", "", f"Command: `{result['command']}`; {result['image_size']} px, lr "
                f"{', '.join(f'{lr:g}' for lr in result['lr_grid'])} per 256.", "", *dataset_table(result), ""]
    (args.results / "README.md").write_text("\n".join(out), encoding="utf-8")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
