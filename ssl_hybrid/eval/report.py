"""Compare backbones on one labeled train/test pair: a markdown table, a JSON file, a label-efficiency
plot (accuracy vs labels per class, mean ± std band over seeds) and, per backbone, a retrieval grid
(test queries with their nearest training neighbours, green border = same class, red = wrong class).

Every number comes from the same evaluators as ``ssl-hybrid knn`` / ``fewshot`` on cached features, so a
report after those commands costs no new extraction.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ssl_hybrid.data.labeled import LabeledSet
from ssl_hybrid.eval.fewshot import DEFAULT_SHOTS, METHODS, fewshot_evaluate
from ssl_hybrid.eval.knn import HEADLINE_K, knn_evaluate, l2_normalize, search

log = logging.getLogger(__name__)

CORRECT = (40, 170, 60)
WRONG = (215, 40, 40)
QUERY = (110, 110, 110)


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.strip("/")).strip("_")[-60:] or "backbone"


def evaluate_backbone(name: str, meta: dict, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                      shots: Sequence[int], seeds: int, methods: Sequence[str], train_set: LabeledSet,
                      split_dir: Optional[Path], num_classes: int) -> dict[str, Any]:
    knn = knn_evaluate(*train, *test, num_classes=num_classes)
    shots = [k for k in shots if k <= np.bincount(train[1]).min()]
    fewshot = fewshot_evaluate(*train, *test, shots=shots, seeds=seeds, methods=methods, train_set=train_set,
                               split_dir=split_dir, num_classes=num_classes)
    return {"name": name, "backbone": {k: meta.get(k) for k in ("spec", "model", "kind", "image_size",
                                                                "num_features", "hash", "pooling")},
            "knn": knn, "fewshot": fewshot["results"]}


def markdown_table(entries: list[dict[str, Any]]) -> str:
    columns = sorted({(r["method"], r["shots"]) for e in entries for r in e["fewshot"]})
    header = ["backbone", f"k-NN top-1 (k={HEADLINE_K})", "k-NN top-5"] + [f"{m} {k}-shot" for m, k in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in entries:
        cells = {(r["method"], r["shots"]): f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}" for r in entry["fewshot"]}
        row = [entry["name"], f"{100 * entry['knn']['top1']:.1f}", f"{100 * entry['knn']['top5']:.1f}"]
        row += [cells.get(col, "–") for col in columns]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_label_efficiency(entries: list[dict[str, Any]], path: Path) -> Path:
    """Top-1 vs labels per class (log x), one line per (backbone, method), shaded ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    styles = {"knn": "-", "linear": "--"}
    for color_index, entry in enumerate(entries):
        color = f"C{color_index}"
        for method in sorted({r["method"] for r in entry["fewshot"]}):
            rows = sorted((r for r in entry["fewshot"] if r["method"] == method), key=lambda r: r["shots"])
            x = np.array([r["shots"] for r in rows])
            mean = np.array([r["mean"] for r in rows]) * 100
            std = np.array([r["std"] for r in rows]) * 100
            ax.plot(x, mean, styles.get(method, ":"), marker="o", color=color, label=f"{entry['name']} · {method}")
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    shots = sorted({r["shots"] for e in entries for r in e["fewshot"]})
    if shots:
        ax.set_xticks(shots, [str(s) for s in shots])
        ax.minorticks_off()  # log-scale minor labels (2x10^0...) only clutter a few integer shot counts
    ax.set_xlabel("labels per class")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title("Label efficiency (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def retrieval_grid(train_set: LabeledSet, test_set: LabeledSet, train_features: np.ndarray,
                   test_features: np.ndarray, path: Path, queries: int = 8, neighbours: int = 6,
                   seed: int = 0, thumb: int = 96, border: int = 5) -> dict[str, Any]:
    """Rows: a test query (grey border) then its nearest training images (green = same class, red = not)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(test_set), size=min(queries, len(test_set)), replace=False))
    k = min(neighbours, len(train_set))
    _, indices = search(l2_normalize(train_features), l2_normalize(test_features[picked]), k)  # [Q, k]
    cell = thumb + 2 * border
    caption = 14
    grid = Image.new("RGB", ((k + 1) * cell + 8, len(picked) * (cell + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    correct = 0
    for row, query in enumerate(picked):
        query_label = test_set.samples[query].label
        y = row * (cell + caption)
        _paste(grid, draw, test_set.load_image(int(query)), (0, y), QUERY, thumb, border)
        draw.text((2, y + cell), test_set.classes[query_label][:14], fill=(0, 0, 0))
        for col, neighbour in enumerate(indices[row]):
            label = train_set.samples[neighbour].label
            correct += label == query_label
            x = (col + 1) * cell + 8
            _paste(grid, draw, train_set.load_image(int(neighbour)), (x, y), CORRECT if label == query_label else WRONG,
                   thumb, border)
            draw.text((x + 2, y + cell), train_set.classes[label][:14], fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, format="PNG")
    return {"path": str(path), "queries": len(picked), "neighbours": k,
            "neighbour_precision": float(correct) / max(1, len(picked) * k)}


def _paste(grid, draw, image, origin: tuple[int, int], color, thumb: int, border: int) -> None:
    from PIL import ImageOps

    x, y = origin
    draw.rectangle([x, y, x + thumb + 2 * border - 1, y + thumb + 2 * border - 1], fill=color)
    grid.paste(ImageOps.fit(image, (thumb, thumb)), (x + border, y + border))


def build_report(specs: Sequence[str], train_set: LabeledSet, test_set: LabeledSet, out_dir: Path,
                 names: Optional[Sequence[str]] = None, shots: Sequence[int] = DEFAULT_SHOTS, seeds: int = 5,
                 methods: Sequence[str] = METHODS, image_size: Optional[int] = None, batch_size: int = 128,
                 num_workers: int = 0, cache_dir: Optional[Path] = None, grid_queries: int = 8,
                 pooling: str = "multiscale") -> dict[str, Any]:
    """Evaluate each backbone and write report.md, report.json, label_efficiency.png, retrieval_<name>.png.
    ``pooling`` (features.POOLINGS) applies to every backbone alike; what each one got is in its entry."""
    from ssl_hybrid.eval.features import features_for_spec, is_main_process
    from ssl_hybrid.runs import write_json_atomic

    out_dir = Path(out_dir)
    names = list(names) if names else [slug(s) for s in specs]
    entries = []
    for spec, name in zip(specs, names):
        meta, (train, test) = features_for_spec(spec, [train_set, test_set], image_size, batch_size,
                                                num_workers, cache_dir, pooling=pooling)
        if not is_main_process():  # other ranks only helped extract (a collective step)
            continue
        entry = evaluate_backbone(name, meta, train, test, shots, seeds, methods, train_set,
                                  out_dir / "splits", len(train_set.classes))
        entry["retrieval_grid"] = retrieval_grid(train_set, test_set, train[0], test[0],
                                                 out_dir / f"retrieval_{slug(name)}.png", queries=grid_queries)
        entries.append(entry)
    if not is_main_process():
        return {"entries": [], "table": "", "plot": None, "markdown": None}
    plot = plot_label_efficiency(entries, out_dir / "label_efficiency.png")
    table = markdown_table(entries)
    (out_dir / "report.md").write_text(
        f"# Backbone comparison\n\ntrain: `{train_set.source}` ({len(train_set)} images, "
        f"{len(train_set.classes)} classes) · test: `{test_set.source}` ({len(test_set)} images)\n\n"
        f"Top-1 / top-5 in %; k-shot cells are mean ± std over {seeds} seeded splits.\n\n{table}\n"
        f"![label efficiency]({plot.name})\n\n"
        + "".join(f"![retrieval {e['name']}]({Path(e['retrieval_grid']['path']).name})\n" for e in entries),
        encoding="utf-8")
    report = {"train": train_set.source, "test": test_set.source, "entries": entries, "table": table,
              "plot": str(plot), "markdown": str(out_dir / "report.md")}
    write_json_atomic(out_dir / "report.json", report)
    return report
