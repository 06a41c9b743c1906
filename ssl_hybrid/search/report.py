"""Search outputs: the Pareto table (markdown + JSON) and the accuracy-vs-cost scatter plot.

Scores compared across candidates are the rung-0 scores: every accepted candidate got the same step
budget there, so they are comparable; a later rung's score (more steps) is shown next to it but is not
mixed into the front. A candidate is Pareto-optimal when no other one has a score at least as high and
latency and GFLOPs at least as low, with one of them strictly better.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COSTS = ("latency_ms", "gflops")


def dominates(a: dict[str, float], b: dict[str, float], costs: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` everywhere and strictly better somewhere (score up, costs down)."""
    no_worse = a["score"] >= b["score"] and all(a[c] <= b[c] for c in costs)
    better = a["score"] > b["score"] or any(a[c] < b[c] for c in costs)
    return no_worse and better


def pareto_front(points: list[dict[str, Any]], costs: Sequence[str] = COSTS) -> list[str]:
    """Ids of the non-dominated points (each point: id, score, and every cost)."""
    return [p["id"] for p in points if not any(dominates(q, p, costs) for q in points if q is not p)]


def build_rows(state_data: dict[str, Any], winner: str | None) -> list[dict[str, Any]]:
    """One row per candidate (accepted, rejected and pruned), best rung-0 score first."""
    from ssl_hybrid.search.space import Candidate

    rungs = state_data["rungs"]
    rows = []
    for cid in state_data["order"]:
        candidate = Candidate.from_json(state_data["candidates"][cid])
        measured = state_data["measurements"].get(cid, {})
        row: dict[str, Any] = {
            "id": cid,
            "label": candidate.label(),
            "choices": candidate.as_dict(),
            "params_m": measured.get("params_m"),
            "gflops": measured.get("gflops"),
            "latency_ms": measured.get("latency_ms"),
            "train_images_per_s": measured.get("train_images_per_s"),
            "zero_cost": state_data["zero_cost"].get(cid),
            "status": _status(cid, measured, state_data, rungs),
            "pareto": False,
            "chosen": cid == winner,
        }
        for rung in rungs:
            result = rung["scores"].get(cid)
            if result is not None:
                row[f"score_r{rung['index']}"] = result.get("score")
                row["last_rung"], row["last_steps"], row["last_score"] = (
                    rung["index"],
                    rung["steps"],
                    result.get("score"),
                )
        row["score"] = row.get("score_r0")
        first = rungs[0]["scores"].get(cid, {}) if rungs else {}
        row["init_score"] = first.get("init_score")  # the same k-NN at random init: what pretraining added
        rows.append(row)
    scored = [r for r in rows if r["score"] is not None and r["latency_ms"] is not None and r["gflops"] is not None]
    front = set(pareto_front(scored))
    for row in rows:
        row["pareto"] = row["id"] in front
    rows.sort(key=lambda r: (r["score"] is None, -(r["score"] or 0.0), r["id"]))
    return rows


def _status(cid: str, measured: dict[str, Any], state_data: dict[str, Any], rungs: list[dict]) -> str:
    if measured.get("rejected"):
        return "over budget: " + measured["rejected"]
    if cid in state_data["pruned"]:
        return "pruned (zero-cost)"
    reached = [r["index"] for r in rungs if cid in r["scores"]]
    if not reached:
        return "not scored"
    last = rungs[reached[-1]]["scores"][cid]
    if last.get("score") is None:
        return f"failed at rung {reached[-1]}: {last.get('error', '?')}"
    return f"rung {reached[-1]}"


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(rows: list[dict[str, Any]], score_name: str = "k-NN top-1") -> str:
    rung_cols = sorted({k for r in rows for k in r if k.startswith("score_r")}, key=lambda k: int(k[7:]))
    with_init = any(r.get("init_score") is not None for r in rows)
    head = (
        ["", "id", "architecture", "params (M)", "GFLOPs", "latency (ms)"]
        + ([f"{score_name} init"] if with_init else [])
        + [f"{score_name} r{k[7:]}" for k in rung_cols]
        + ["status"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = ("★" if r["chosen"] else "") + ("P" if r["pareto"] else "")
        cells = (
            [
                mark,
                f"`{r['id']}`",
                r["label"],
                _fmt(r["params_m"], ".2f"),
                _fmt(r["gflops"], ".3g"),
                _fmt(r["latency_ms"], ".1f"),
            ]
            + ([_fmt(r.get("init_score"), ".3f")] if with_init else [])
            + [_fmt(r.get(k), ".3f") for k in rung_cols]
            + [r["status"]]
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "★ = chosen (best at the highest rung), P = Pareto-optimal on rung-0 score vs latency and GFLOPs"
        + ("; init = the same k-NN at random initialization (no pretraining)." if with_init else ".")
    )
    return "\n".join(lines) + "\n"


def scatter_plot(rows: list[dict[str, Any]], path: str | Path, title: str, score_name: str = "k-NN top-1") -> Path:
    """Two panels (score vs latency, score vs GFLOPs); the 2-D Pareto front of each panel drawn as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["score"] is not None and r["latency_ms"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, cost, xlabel in zip(axes, COSTS, ("latency (ms)", "GFLOPs / image")):
        front_ids = set(pareto_front(scored, (cost,)))
        others = [r for r in scored if r["id"] not in front_ids]
        front = sorted((r for r in scored if r["id"] in front_ids), key=lambda r: r[cost])
        ax.scatter([r[cost] for r in others], [r["score"] for r in others], c="tab:gray", alpha=0.7, label="candidate")
        ax.step([r[cost] for r in front], [r["score"] for r in front], where="post", c="tab:red", lw=1.2)
        ax.scatter([r[cost] for r in front], [r["score"] for r in front], c="tab:red", label="Pareto front")
        for r in scored:
            ax.annotate(r["id"], (r[cost], r["score"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        chosen = [r for r in scored if r["chosen"]]
        if chosen:
            ax.scatter(
                [chosen[0][cost]],
                [chosen[0]["score"]],
                marker="*",
                s=220,
                facecolors="none",
                edgecolors="tab:blue",
                linewidths=1.5,
                label="chosen",
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{score_name} (rung 0)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from ssl_hybrid.runs import atomic_path

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)
