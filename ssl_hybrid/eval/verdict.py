"""What a report's numbers mean: the chance level of the label set, how train and test relate, each
backbone's pretraining budget, and a one-line verdict computed from the numbers.

Noise, in one rule for every metric: a measurement's standard error is the larger of the seed-to-seed
spread of the mean (std / sqrt(seeds); k-shot rows) and the binomial error of an accuracy measured on
n test images, sqrt(p (1 - p) / n) with p shrunk towards 1/2 by one image each way (so 0% and 100% still
carry an error). A difference is "beyond noise" when it exceeds 2 standard errors of the difference,
2 sqrt(se_a^2 + se_b^2) (about a 95% interval); "above chance" likewise against the chance level.
Nothing here assumes which model or objective produced the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ssl_hybrid.data.labeled import LabeledSet, shared_images

RANDOM_KINDS = ("random", "timm")  # backbone specs that are a random initialization (see eval/backbones.py)
STOP_REASONS = {"done": "all steps done", "max_seconds": "time budget spent", "signal": "interrupted by a signal"}


# ---------------------------------------------------------------------------------------------
# The data: classes, chance, split
# ---------------------------------------------------------------------------------------------


def chance_level(train_set: LabeledSet, test_set: LabeledSet) -> dict[str, float]:
    """Top-1 a classifier reaches without looking at the image: uniform guessing (1 / classes) or always
    naming the most common test class, whichever is higher; top-5 of uniform guessing."""
    classes = len(train_set.classes)
    counts = np.bincount(test_set.labels, minlength=classes) if len(test_set) else np.zeros(1)
    uniform, majority = 1.0 / classes, float(counts.max() / max(1, counts.sum()))
    return {
        "top1": max(uniform, majority),
        "uniform_top1": uniform,
        "majority_top1": majority,
        "top5": min(5, classes) / classes,
        "num_classes": classes,
    }


def _per_class(labeled: LabeledSet) -> dict[str, int]:
    counts = np.bincount(labeled.labels, minlength=len(labeled.classes))
    counts = counts[counts > 0]
    return {"min": int(counts.min()), "max": int(counts.max())} if len(counts) else {"min": 0, "max": 0}


def data_context(train_set: LabeledSet, test_set: LabeledSet, split_note: str | None = None) -> dict[str, Any]:
    """Sizes, per-class counts, skipped images, chance and a sentence on how test relates to train."""
    shared = shared_images(train_set, test_set)
    if shared:
        relation = (
            f"{shared} of the {len(test_set)} test images are also training images: each finds "
            "itself as nearest neighbour, so the accuracies are inflated"
        )
    elif train_set.source == test_set.source:
        relation = f"test and train are disjoint parts of `{train_set.source}` (no image in both)"
    else:
        relation = "test and train are separate sets (no image in both)"
    if split_note:
        relation += f"; {split_note}"
    sides = {
        name: {"source": s.source, "images": len(s), "per_class": _per_class(s), "skipped_unreadable": len(s.skipped)}
        for name, s in (("train", train_set), ("test", test_set))
    }
    return {
        **sides,
        "num_classes": len(train_set.classes),
        "chance": chance_level(train_set, test_set),
        "test_images_in_train": shared,
        "split": relation,
    }


# ---------------------------------------------------------------------------------------------
# Noise and comparisons
# ---------------------------------------------------------------------------------------------


def binomial_se(accuracy: float, n: int) -> float:
    """Standard error of an accuracy over n images, p shrunk by one image each way: (p n + 1) / (n + 2)."""
    p = (accuracy * n + 1) / (n + 2)
    return math.sqrt(p * (1 - p) / max(1, n))


def metrics(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The entry's accuracies with their standard errors: k-NN top-1, then every k-shot row."""
    knn = entry["knn"]
    rows = [
        {
            "metric": "knn_top1",
            "label": f"k-NN top-1 (k={knn['k']})",
            "method": None,
            "shots": None,
            "value": knn["top1"],
            "se": binomial_se(knn["top1"], knn["n_test"]),
            "n_test": knn["n_test"],
        }
    ]
    scored = entry.get("fewshot_n_test", knn["n_test"])  # the k-NN may score more queries (leave-one-out)
    for row in sorted(entry["fewshot"], key=lambda r: (r["method"], r["shots"])):
        seeds = len(row.get("runs") or [None])
        n_test = row.get("n_test", scored)  # protocol "rest": each shot count scores its own number of images
        rows.append(
            {
                "metric": f"{row['method']}_{row['shots']}shot",
                "label": f"{row['method']} {row['shots']}-shot",
                "method": row["method"],
                "shots": row["shots"],
                "value": row["mean"],
                "n_test": n_test,
                "se": max(row["std"] / math.sqrt(seeds), binomial_se(row["mean"], n_test)),
            }
        )
    return rows


def compare(candidate: dict[str, Any], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """Per metric both have: value, baseline value, delta, noise (2 SE of the difference), beyond noise."""
    base = {m["metric"]: m for m in metrics(baseline)}
    out = []
    for m in metrics(candidate):
        b = base.get(m["metric"])
        if b is None:
            continue
        delta, noise = m["value"] - b["value"], 2 * math.sqrt(m["se"] ** 2 + b["se"] ** 2)
        out.append(
            {
                **{k: m[k] for k in ("metric", "label", "method", "shots", "value")},
                "baseline": b["value"],
                "delta": delta,
                "noise": noise,
                "beyond_noise": abs(delta) > noise,
            }
        )
    return out


def above_chance(entry: dict[str, Any], chance: float) -> dict[str, Any]:
    """Is the entry's k-NN top-1 (and best k-shot) beyond noise above the chance level?"""
    rows = metrics(entry)
    judged = []
    for m in rows:
        margin = 2 * max(m["se"], binomial_se(chance, m["n_test"]))
        judged.append(
            {"metric": m["metric"], "value": m["value"], "margin": margin, "above": m["value"] - chance > margin}
        )
    return {"any": any(j["above"] for j in judged), "knn_top1": judged[0]["above"], "metrics": judged}


def pick_baseline(entries: Sequence[dict[str, Any]], baseline: str | None = None) -> int | None:
    """Index of the baseline entry: the one named, else the last random-init one when others are not."""
    if baseline is not None:
        names = [e["name"] for e in entries]
        return names.index(baseline) if baseline in names else None
    random_init = [i for i, e in enumerate(entries) if e["backbone"].get("kind") in RANDOM_KINDS]
    return random_init[-1] if random_init and len(random_init) < len(entries) else None


# ---------------------------------------------------------------------------------------------
# The verdict
# ---------------------------------------------------------------------------------------------


def _headline(comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """k-NN top-1 and, per method, the largest shot count: what the one-line verdict spells out."""
    largest: dict[str, dict[str, Any]] = {}
    for c in comparisons:
        if c["method"] and (c["method"] not in largest or c["shots"] > largest[c["method"]]["shots"]):
            largest[c["method"]] = c
    return [c for c in comparisons if c["method"] is None] + list(largest.values())


def _gap_text(c: dict[str, Any]) -> str:
    where = "beyond" if c["beyond_noise"] else "within"
    return (
        f"{c['label']} {100 * c['value']:.1f} vs {100 * c['baseline']:.1f} "
        f"({100 * c['delta']:+.1f} points, {where} noise ±{100 * c['noise']:.1f})"
    )


def outcome(comparisons: list[dict[str, Any]]) -> str:
    """better | worse | mixed | within noise, from the metrics whose gap is beyond noise."""
    better = [c for c in comparisons if c["beyond_noise"] and c["delta"] > 0]
    worse = [c for c in comparisons if c["beyond_noise"] and c["delta"] < 0]
    return "mixed" if better and worse else "better" if better else "worse" if worse else "within noise"


def compare_line(name: str, base_name: str, comparisons: list[dict[str, Any]]) -> str:
    result = outcome(comparisons)
    beyond = sum(c["beyond_noise"] for c in comparisons)
    lead = {
        "better": f"{name} beats {base_name} beyond noise on {beyond} of {len(comparisons)} metrics",
        "worse": f"{name} is worse than {base_name} beyond noise on {beyond} of {len(comparisons)} metrics",
        "mixed": f"{name} vs {base_name} is mixed (better on some metrics, worse on others, beyond noise)",
        "within noise": f"{name} and {base_name} do not differ beyond noise on any of {len(comparisons)} metrics",
    }
    return f"{lead[result]}: " + "; ".join(_gap_text(c) for c in _headline(comparisons))


def chance_text(entries: Sequence[dict[str, Any]], judged: list[dict[str, Any]], chance: float) -> str:
    at = [e["name"] for e, j in zip(entries, judged) if not j["any"]]
    level = f"chance level ({100 * chance:.1f}%)"
    if not at:
        return f"{'Both are' if len(entries) == 2 else 'All are'} beyond noise above {level} on some metric"
    if len(at) == len(entries):
        who = "Both are" if len(at) == 2 else "It is" if len(at) == 1 else "All are"
        return f"{who} within noise of {level} on every metric"
    return f"{', '.join(at)} {'is' if len(at) == 1 else 'are'} within noise of {level} on every metric"


def verdict(entries: Sequence[dict[str, Any]], chance: float, baseline: str | None = None) -> dict[str, Any]:
    """``{"line", "baseline", "comparisons": {name: [...]}, "outcomes", "above_chance"}``; ``line`` is the
    one-line verdict printed by ``quickstart`` and ``report`` and written at the top of report.md."""
    judged = [above_chance(e, chance) for e in entries]
    index = pick_baseline(entries, baseline)
    comparisons, outcomes, parts = {}, {}, []
    if index is not None:
        base = entries[index]
        for entry in entries:
            if entry is not base:
                comparisons[entry["name"]] = compare(entry, base)
                outcomes[entry["name"]] = outcome(comparisons[entry["name"]])
                parts.append(compare_line(entry["name"], base["name"], comparisons[entry["name"]]))
    line = ". ".join(parts + [chance_text(entries, judged, chance)]) + "."
    return {
        "line": line,
        "baseline": entries[index]["name"] if index is not None else None,
        "comparisons": comparisons,
        "outcomes": outcomes,
        "above_chance": {e["name"]: j for e, j in zip(entries, judged)},
        "chance_top1": chance,
        "noise_rule": "beyond noise = difference > 2 standard errors of the difference; standard error = "
        "max(std / sqrt(seeds), binomial sqrt(p(1-p)/n_test))",
    }


# ---------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------


def _objective_text(weights: dict[str, Any] | None) -> str:
    names = {"mim_weight": "MIM", "dino_weight": "DINO", "simclr_weight": "SimCLR"}
    return " + ".join(label for key, label in names.items() if (weights or {}).get(key))


def duration_text(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def budget_text(backbone: dict[str, Any]) -> str:
    """One sentence on what the backbone got: random init, or steps / time / budget / stop reason."""
    if backbone.get("kind") in RANDOM_KINDS:
        return "random initialization (seeded), no pretraining"
    record = backbone.get("pretraining") or {}
    if "step" not in record:
        return "pretrained weights (no training record with the weights)"
    step, steps = record["step"], record.get("steps")
    text = f"{step} of {steps} steps" if steps else f"{step} steps"
    seconds, start = record.get("train_seconds"), record.get("start_step", 0)
    if seconds is not None:
        text += (
            f" in {duration_text(seconds)}"
            if not start
            else f" (steps {start}→{step} in {duration_text(seconds)} after resuming)"
        )
    if steps:
        limit = record.get("max_seconds") or 0
        text += (
            f"; budget {steps} steps or {duration_text(limit)}, whichever comes first"
            if limit
            else f"; budget {steps} steps, no time limit"
        )
    if record.get("stopped"):
        text += f"; stopped: {STOP_REASONS.get(record['stopped'], record['stopped'])}"
    objective = _objective_text(record.get("objective"))
    return text + (f"; objective {objective}" if objective else "")
