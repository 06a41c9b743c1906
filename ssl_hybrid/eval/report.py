"""Compare backbones on one labeled train/test pair: a markdown table, a JSON file, a label-efficiency
plot (accuracy vs labels per class, mean ± std band over seeds, chance line) and, per backbone, a retrieval
grid (test queries with their nearest training neighbours, green border = same class, red = wrong class).

The report says what its numbers mean (``eval/verdict.py``): the chance level, how test relates to train,
shots × seeds, image size, each backbone's pretraining budget, and a one-line verdict computed from the
numbers. Every number comes from the same evaluators as ``ssl-hybrid knn`` / ``fewshot`` on cached
features, so a report after those commands costs no new extraction.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ssl_hybrid.config import KNN_PROTOCOLS, EvalConfig
from ssl_hybrid.data.labeled import LabeledSet
from ssl_hybrid.eval.backbones import backbone_summary
from ssl_hybrid.eval.fewshot import DEFAULT_METHODS, DEFAULT_SHOTS, check_protocol, draw_pool, fewshot_evaluate
from ssl_hybrid.eval.knn import HEADLINE_K, knn_evaluate, l2_normalize, leave_one_out_knn, search
from ssl_hybrid.eval.verdict import budget_text, data_context, verdict

log = logging.getLogger(__name__)

CORRECT = (40, 170, 60)
WRONG = (215, 40, 40)
QUERY = (110, 110, 110)


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.strip("/")).strip("_")[-60:] or "backbone"


def evaluate_knn(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    protocol: str = EvalConfig.knn_protocol,
) -> dict[str, Any]:
    """The k-NN entry of the report (``protocol`` one of config.KNN_PROTOCOLS). Leave-one-out classifies
    every labeled image (train and test) by all the others, so a small labeled set gives all its labels as
    queries (the quickstart: 370 instead of 111); the held-out result is kept under ``heldout``."""
    if protocol not in KNN_PROTOCOLS:
        raise ValueError(f"unknown k-NN protocol '{protocol}' (one of {', '.join(KNN_PROTOCOLS)})")
    heldout = knn_evaluate(*train, *test, num_classes=num_classes)
    if protocol == "heldout":
        return {**heldout, "protocol": "heldout"}
    features, labels = np.concatenate([train[0], test[0]]), np.concatenate([train[1], test[1]])
    result = leave_one_out_knn(features, labels)
    result["heldout"] = {key: heldout[key] for key in ("top1", "top5", "n_train", "n_test")}
    return result


def evaluate_backbone(
    name: str,
    meta: dict,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    shots: Sequence[int],
    seeds: int,
    methods: Sequence[str],
    train_set: LabeledSet,
    split_dir: Path | None,
    num_classes: int,
    knn_protocol: str = EvalConfig.knn_protocol,
    fewshot_protocol: str = EvalConfig.fewshot_protocol,
    test_set: LabeledSet | None = None,
) -> dict[str, Any]:
    knn = evaluate_knn(train, test, num_classes, knn_protocol)
    fewest = int(np.bincount(draw_pool(train[1], test[1], fewshot_protocol)).min())
    kept = [k for k in shots if k <= fewest]
    fewshot = fewshot_evaluate(
        *train,
        *test,
        shots=kept,
        seeds=seeds,
        methods=methods,
        train_set=train_set,
        split_dir=split_dir,
        num_classes=num_classes,
        protocol=fewshot_protocol,
        test_set=test_set,
    )
    dropped = [k for k in shots if k > fewest]
    if dropped:
        log.warning(
            "%s: %s-shot skipped: the smallest class has %d %s",
            name,
            "/".join(map(str, dropped)),
            fewest,
            "training images" if fewshot_protocol == "heldout" else "labeled images (train + test)",
        )
    return {
        "name": name,
        "backbone": backbone_summary(meta, "pooling", "pretraining"),
        "knn": knn,
        "fewshot": fewshot["results"],
        "fewshot_n_test": fewshot["n_test"],
        "shots_skipped": dropped,
    }


def markdown_table(entries: list[dict[str, Any]], chance: dict[str, float] | None = None) -> str:
    """One row per backbone (top-1 / top-5 in %, k-shot mean ± std) and, given ``chance``, a chance row."""
    columns = sorted({(r["method"], r["shots"]) for e in entries for r in e["fewshot"]})
    header = ["backbone", f"k-NN top-1 (k={HEADLINE_K})", "k-NN top-5"] + [f"{m} {k}-shot" for m, k in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in entries:
        cells = {(r["method"], r["shots"]): f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}" for r in entry["fewshot"]}
        row = [entry["name"], f"{100 * entry['knn']['top1']:.1f}", f"{100 * entry['knn']['top5']:.1f}"]
        row += [cells.get(col, "–") for col in columns]
        lines.append("| " + " | ".join(row) + " |")
    if chance is not None:
        top1 = f"{100 * chance['top1']:.1f}"
        row = [f"chance ({chance['num_classes']} classes)", top1, f"{100 * chance['top5']:.1f}"] + [top1] * len(columns)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def figure_data(ax) -> dict[str, Any]:
    """What a matplotlib Axes shows, read back from it: title, axis labels and limits, x ticks, lines."""
    return {
        "title": ax.get_title(),
        "xlabel": ax.get_xlabel(),
        "ylabel": ax.get_ylabel(),
        "ylim": [float(v) for v in ax.get_ylim()],
        "xscale": ax.get_xscale(),
        "xticks": [float(v) for v in ax.get_xticks()],
        "xticklabels": [t.get_text() for t in ax.get_xticklabels()],
        "lines": [
            {
                "label": line.get_label(),
                "x": [float(v) for v in line.get_xdata()],
                "y": [float(v) for v in line.get_ydata()],
                "linestyle": line.get_linestyle(),
            }
            for line in ax.get_lines()
        ],
        "legend": [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else [],
    }


def plot_label_efficiency(
    entries: list[dict[str, Any]], path: Path, chance: float | None = None, seeds: int | None = None
) -> dict[str, Any]:
    """Top-1 vs labels per class (log x, every evaluated shot count a tick), one line per (backbone,
    method), shaded ± std over seeds, a dotted chance line; the y axis starts at 0 so gaps read true.
    Returns the figure's data as read back from the plot (see :func:`figure_data`) plus ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    styles = {"knn": "-", "linear": "--"}
    top = 100 * chance if chance else 0.0
    for color_index, entry in enumerate(entries):
        color = f"C{color_index}"
        for method in sorted({r["method"] for r in entry["fewshot"]}):
            rows = sorted((r for r in entry["fewshot"] if r["method"] == method), key=lambda r: r["shots"])
            x = np.array([r["shots"] for r in rows])
            mean = np.array([r["mean"] for r in rows]) * 100
            std = np.array([r["std"] for r in rows]) * 100
            ax.plot(x, mean, styles.get(method, ":"), marker="o", color=color, label=f"{entry['name']} · {method}")
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
            top = max(top, float((mean + std).max()))
    if chance:
        ax.axhline(100 * chance, color="0.35", linestyle=":", linewidth=1.2, label=f"chance ({100 * chance:.1f}%)")
    ax.set_xscale("log")
    shots = sorted({r["shots"] for e in entries for r in e["fewshot"]})
    if shots:
        ax.set_xticks(shots, [str(s) for s in shots])
        ax.minorticks_off()  # log-scale minor labels (2x10^0...) only clutter a few integer shot counts
        ax.set_xlim(shots[0] / 1.3, shots[-1] * 1.3)
    ax.set_ylim(0, min(100.0, max(5.0, 1.15 * top)))  # from 0: a band near chance must not look like a slope
    ax.set_xlabel("labels per class")
    ax.set_ylabel("test top-1 accuracy (%)")
    seed_text = f"{seeds} seeds" if seeds else "seeds"
    ax.set_title(f"Label efficiency (mean ± std over {seed_text} per point)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    data = figure_data(ax)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return dict(data, path=str(path))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def wrap_text(draw, text: str, font, width: int, max_lines: int = 2) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` px wide;
    words longer than a line are cut, and a last line that still does not fit ends in '…'."""
    fits = lambda line: draw.textlength(line, font=font) <= width  # noqa: E731
    lines: list[str] = []
    for word in text.split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] = f"{lines[-1]} {word}"
            continue
        while not fits(word) and len(word) > 1:  # a single long word: cut it across lines
            cut = max(i for i in range(1, len(word) + 1) if fits(word[:i]))
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) > max_lines:
        last = " ".join(lines[max_lines - 1 :])
        while last and not fits(last + "…"):
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "…"]
    return lines


METHOD_NAMES = {"knn": "k-NN", "linear": "linear probe"}
LEGEND = (
    ("query (test image)", QUERY),
    ("neighbour of the same class", CORRECT),
    ("neighbour of another class", WRONG),
)


def _grid_header(draw, title_lines: list[str], font, line: int) -> list[dict[str, Any]]:
    """Draw the title lines and the colour legend at the top; returns the legend boxes."""
    for i, text in enumerate(title_lines):
        draw.text((4, 3 + i * line), text, fill=(0, 0, 0), font=font)
    y, x, legend = 6 + len(title_lines) * line, 4, []
    for label, color in LEGEND:
        box = [x, y, x + line - 3, y + line - 3]
        draw.rectangle(box, fill=color)
        draw.text((x + line + 2, y), label, fill=(0, 0, 0), font=font)
        legend.append({"label": label, "color": list(color), "box": box})
        x += line + 14 + int(draw.textlength(label, font=font))
    return legend


def retrieval_grid(
    train_set: LabeledSet,
    test_set: LabeledSet,
    train_features: np.ndarray,
    test_features: np.ndarray,
    path: Path,
    queries: int = 8,
    neighbours: int = 6,
    seed: int = 0,
    thumb: int = 96,
    border: int = 5,
    title: str | None = None,
) -> dict[str, Any]:
    """Rows: a test query (grey border) then its nearest training images (green = same class, red = not),
    under a title and a colour legend; class names wrap to two lines under each image.

    Returns the layout with what was drawn (``header``, ``cell``, ``caption`` heights, ``title``, legend
    boxes, every caption's lines), so tests check the saved image against it."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(test_set), size=min(queries, len(test_set)), replace=False))
    k = min(neighbours, len(train_set))
    _, indices = search(l2_normalize(train_features), l2_normalize(test_features[picked]), k)  # [Q, k]
    font, line, gap = _font(11), 13, 8
    cell = thumb + 2 * border
    caption = 2 * line + 4
    width = (k + 1) * cell + gap
    title = title or f"Nearest training images of {len(picked)} test queries (cosine similarity of the features)"
    title_lines = wrap_text(ImageDraw.Draw(Image.new("RGB", (1, 1))), title, font, width - 8)
    header = 12 + (len(title_lines) + 1) * line  # title, then one legend row
    grid = Image.new("RGB", (width, header + len(picked) * (cell + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    legend = _grid_header(draw, title_lines, font, line)
    correct, captions = 0, []
    for row, query in enumerate(picked):
        query_label = test_set.samples[query].label
        y = header + row * (cell + caption)
        row_captions = [_cell(grid, draw, test_set, int(query), (0, y), QUERY, thumb, border, font, line)]
        for col, neighbour in enumerate(indices[row]):
            label = train_set.samples[neighbour].label
            correct += label == query_label
            color = CORRECT if label == query_label else WRONG
            row_captions.append(
                _cell(
                    grid, draw, train_set, int(neighbour), ((col + 1) * cell + gap, y), color, thumb, border, font, line
                )
            )
        captions.append(row_captions)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, format="PNG")
    return {
        "path": str(path),
        "queries": len(picked),
        "neighbours": k,
        "neighbour_precision": float(correct) / max(1, len(picked) * k),
        "title": title_lines,
        "legend": legend,
        "layout": {"header": header, "cell": cell, "caption": caption, "gap": gap},
        "captions": captions,
    }


def _cell(
    grid,
    draw,
    labeled: LabeledSet,
    index: int,
    origin: tuple[int, int],
    color,
    thumb: int,
    border: int,
    font,
    line: int,
) -> list[str]:
    """One bordered thumbnail with its class name wrapped below it; returns the caption lines."""
    from PIL import ImageOps

    x, y = origin
    cell = thumb + 2 * border
    draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=color)
    grid.paste(ImageOps.fit(labeled.load_image(index), (thumb, thumb)), (x + border, y + border))
    lines = wrap_text(draw, labeled.classes[labeled.samples[index].label].replace("_", " "), font, cell - 4)
    for i, text in enumerate(lines):
        draw.text((x + 2, y + cell + 1 + i * line), text, fill=(0, 0, 0), font=font)
    return lines


def build_report(
    specs: Sequence[str],
    train_set: LabeledSet,
    test_set: LabeledSet,
    out_dir: Path,
    names: Sequence[str] | None = None,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: int = EvalConfig.seeds,
    methods: Sequence[str] = DEFAULT_METHODS,
    image_size: int | None = None,
    batch_size: int = EvalConfig.batch_size,
    num_workers: int = 0,
    cache_dir: Path | None = None,
    grid_queries: int = 8,
    pooling: str = EvalConfig.pooling,
    split_note: str | None = None,
    baseline: str | None = None,
    knn_protocol: str = EvalConfig.knn_protocol,
    fewshot_protocol: str = EvalConfig.fewshot_protocol,
    budget_note: str | None = None,
) -> dict[str, Any]:
    """Evaluate each backbone and write report.md, report.json, label_efficiency.png, retrieval_<name>.png.
    ``pooling`` (config.POOLINGS) applies to every backbone alike; what each one got is in its entry.
    ``split_note`` says how test was drawn (e.g. the quickstart's per-class hold-out); ``baseline`` names
    the entry the verdict compares the others with (default: the random-init one, see verdict.pick_baseline);
    ``knn_protocol`` (config.KNN_PROTOCOLS) how the k-NN column is measured, ``fewshot_protocol``
    (config.FEWSHOT_PROTOCOLS) where the k-shot labels come from and what they are scored on; ``budget_note`` a
    sentence on a pretraining too short for the comparison (quickstart.too_few_steps), shown under the verdict."""
    check_protocol(fewshot_protocol)  # before any extraction
    from ssl_hybrid.eval.features import features_for_spec, is_main_process
    from ssl_hybrid.runs import write_json_atomic

    out_dir = Path(out_dir)
    names = list(names) if names else [slug(s) for s in specs]
    # Every collective extraction first, on every rank; rank 0 analyses afterwards, alone. (Analysing each backbone
    # between extractions would leave the other ranks waiting in the next collective for as long as the analysis
    # takes, past the process group's timeout on a slow fit.)
    extracted = [
        (
            name,
            *features_for_spec(spec, [train_set, test_set], size, batch_size, num_workers, cache_dir, pooling=pooling),
        )
        for spec, name, size in zip(specs, names, image_sizes(specs, image_size))
    ]
    if not is_main_process():  # other ranks only helped extract
        return {"entries": [], "table": "", "plot": None, "markdown": None, "verdict": None}
    entries = []
    for name, meta, (train, test) in extracted:
        entry = evaluate_backbone(
            name,
            meta,
            train,
            test,
            shots,
            seeds,
            methods,
            train_set,
            out_dir / "splits",
            len(train_set.classes),
            knn_protocol,
            fewshot_protocol,
            test_set,
        )
        entry["budget"] = budget_text(entry["backbone"])
        entry["retrieval_grid"] = retrieval_grid(
            train_set,
            test_set,
            train[0],
            test[0],
            out_dir / f"retrieval_{slug(name)}.png",
            queries=grid_queries,
            title=f"{name}: nearest training images of test queries",
        )
        entries.append(entry)
    context = data_context(train_set, test_set, split_note)
    context["protocol"] = protocol(entries, seeds, methods, fewshot_protocol)
    plot = plot_label_efficiency(entries, out_dir / "label_efficiency.png", context["chance"]["top1"], seeds)
    table = markdown_table(entries, context["chance"])
    judged = verdict(entries, context["chance"]["top1"], baseline)
    (out_dir / "report.md").write_text(
        report_markdown(entries, context, judged, table, Path(plot["path"]).name, budget_note), encoding="utf-8"
    )
    report = {
        "train": train_set.source,
        "test": test_set.source,
        "context": context,
        "verdict": judged,
        "budget_note": budget_note,
        "entries": entries,
        "table": table,
        "plot": plot["path"],
        "plot_data": plot,
        "markdown": str(out_dir / "report.md"),
    }
    write_json_atomic(out_dir / "report.json", report)
    return report


def image_sizes(specs: Sequence[str], image_size: int | None = None) -> list[int | None]:
    """The size each backbone is evaluated at: ``image_size`` for all when given; else a saved backbone at its
    pretraining size and a random init (timm:/random:, no size of its own) at the size of the saved ones it is
    compared with, so a gap measures pretraining, not 64 vs 224 px. Saved backbones of different sizes beside a
    random init are refused (it can match only one of them); all random: None (224, backbones.py)."""
    from ssl_hybrid.errors import UserError
    from ssl_hybrid.eval.backbones import native_image_size

    if image_size:
        return [image_size] * len(specs)
    native = [native_image_size(spec) for spec in specs]
    pretrained = sorted({size for size in native if size is not None})
    if len(pretrained) > 1 and None in native:
        raise UserError(
            f"the saved backbones were pretrained at {' and '.join(f'{s} px' for s in pretrained)}: "
            "a random init can be evaluated at only one of them; pass --image-size N to evaluate "
            "every backbone at N px"
        )
    return [size if size is not None else next(iter(pretrained), None) for size in native]


def protocol(
    entries: list[dict[str, Any]],
    seeds: int,
    methods: Sequence[str],
    fewshot_protocol: str = EvalConfig.fewshot_protocol,
) -> dict[str, Any]:
    """How every number was measured: k-NN settings, shots × seeds, image size and pooling per backbone."""
    knn = entries[0]["knn"] if entries else {"k": HEADLINE_K, "temperature": None}
    shots = sorted({r["shots"] for e in entries for r in e["fewshot"]})
    knn_protocol = knn.get("protocol", "heldout")
    bank = (
        f"leave-one-out: every labeled image (train and test) is a query, the other {knn.get('n_train')} are its bank"
        if knn_protocol == "leave_one_out"
        else "every training image"
    )
    return {
        "knn": {"k": knn["k"], "temperature": knn["temperature"], "bank": bank, "protocol": knn_protocol},
        "fewshot": {
            "methods": list(methods),
            "shots": shots,
            "seeds": seeds,
            "protocol": fewshot_protocol,
            "skipped_shots": sorted({k for e in entries for k in e.get("shots_skipped", [])}),
        },
        "image_size": sorted({e["backbone"]["image_size"] for e in entries}),
        "pooling": sorted({str(e["backbone"].get("pooling")) for e in entries}),
    }


def _setup_rows(entries: list[dict[str, Any]], context: dict[str, Any]) -> list[tuple[str, str]]:
    chance, train, test, proto = context["chance"], context["train"], context["test"], context["protocol"]

    def images(side: dict[str, Any]) -> str:
        per = side["per_class"]
        counts = f"{per['min']}" if per["min"] == per["max"] else f"{per['min']}–{per['max']}"
        skipped = f"; {side['skipped_unreadable']} unreadable skipped" if side["skipped_unreadable"] else ""
        return f"{side['images']} images of `{side['source']}` ({counts} per class{skipped})"

    fewshot = proto["fewshot"]
    leave_one_out = proto["knn"].get("protocol") == "leave_one_out"
    shots = ", ".join(map(str, fewshot["shots"])) or "none"
    pool = "labeled images (train + test)" if fewshot.get("protocol") == "rest" else "training images"
    skipped = (
        f" ({'/'.join(map(str, fewshot['skipped_shots']))}-shot skipped: a class has fewer {pool})"
        if fewshot["skipped_shots"]
        else ""
    )
    pooled = fewshot.get("protocol") == "rest"
    roles = ([] if leave_one_out else ["the k-NN bank"]) + (
        [] if pooled else ["the pool the k-shot labels are drawn from"]
    )
    # With both protocols pooled, no accuracy is measured on the test part alone: say what it is used for.
    test_roles = ([] if leave_one_out else ["the k-NN queries"]) + (
        [] if pooled else ["what the k-shot probes are scored on"]
    )
    test_role = (
        " and ".join(test_roles)
        if test_roles
        else f"the queries of the retrieval grids only (the k-NN and k-shot columns score all "
        f"{train['images'] + test['images']} labeled images)"
    )
    methods = " and ".join(METHOD_NAMES.get(m, m) for m in fewshot["methods"])
    drawn = (
        f"drawn from all {train['images'] + test['images']} labeled images (train and test) × {fewshot['seeds']} "
        "seeded draws, each scored on every image it did not draw"
        if pooled
        else f"× {fewshot['seeds']} seeded draws"
    )
    rows = [
        (
            "classes",
            f"{context['num_classes']}: chance level {100 * chance['top1']:.1f}% top-1 "
            f"(1/{context['num_classes']} = {100 * chance['uniform_top1']:.1f}%; always naming the most "
            f"common test class: {100 * chance['majority_top1']:.1f}%), {100 * chance['top5']:.1f}% top-5",
        ),
        ("train", images(train) + f": {' and '.join(roles) if roles else 'the bank of the retrieval grids'}"),
        ("test", images(test) + f": {test_role}; {context['split']}"),
        (
            "k-NN",
            f"DINO protocol: k={proto['knn']['k']}, T={proto['knn']['temperature']}, cosine similarity; "
            + (proto["knn"]["bank"] if leave_one_out else "every training image in the bank"),
        ),
        ("k-shot", f"{methods} on {shots} labels per class {drawn} (mean ± std; the ids are in splits/){skipped}"),
        (
            "image size",
            f"{', '.join(f'{s} px' for s in proto['image_size'])} (resize + center crop); "
            f"{', '.join(proto['pooling'])} pooling",
        ),
    ]
    return rows + [(e["name"], e["budget"]) for e in entries]


def _difference_table(judged: dict[str, Any]) -> str:
    if not judged["comparisons"]:
        return ""
    lines = [
        f"Differences from **{judged['baseline']}** in points; beyond noise = larger than 2 standard errors "
        "of the difference (standard error: the larger of std/√seeds and the binomial error of the test "
        "set).\n",
        "| backbone | metric | value | baseline | difference | noise (±) | beyond noise |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in judged["comparisons"].items():
        for c in rows:
            lines.append(
                f"| {name} | {c['label']} | {100 * c['value']:.1f} | {100 * c['baseline']:.1f} | "
                f"{100 * c['delta']:+.1f} | {100 * c['noise']:.1f} | {'yes' if c['beyond_noise'] else 'no'} |"
            )
    return "\n".join(lines) + "\n\n"


def report_markdown(
    entries: list[dict[str, Any]],
    context: dict[str, Any],
    judged: dict[str, Any],
    table: str,
    plot_name: str,
    budget_note: str | None = None,
) -> str:
    setup = "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in _setup_rows(entries, context))
    grids = "".join(f"![retrieval {e['name']}]({Path(e['retrieval_grid']['path']).name})\n" for e in entries)
    note = f"**Too few steps:** {budget_note}\n\n" if budget_note else ""
    return (
        f"# Backbone comparison\n\n**Verdict:** {judged['line']}\n\n{note}{setup}\n"
        f"Top-1 / top-5 in %; k-shot cells are mean ± std over {context['protocol']['fewshot']['seeds']} "
        f"seeded draws; the last row is chance.\n\n{table}\n{_difference_table(judged)}"
        f"![label efficiency]({plot_name})\n\n{grids}"
    )
