"""Confirmation: is the chosen design really as good as the presets, or did it win on noise?

Successive halving picks the winner on one pretraining run per rung, so its last score is the best of
several noisy draws and overstates it (the winner's curse). The confirmation stage retrains the winner
and every reference preset at the last rung's budget with ``confirm.seeds`` fresh training seeds (seeds
the search never used), the same seed for each design, and compares them seed by seed:
mean ± sd per design and, per reference, the paired difference winner − reference with a 95% t-interval
(one interval per reference, not corrected for comparing against several).
A rung-0 design that only looked good is exposed here; one that holds up is worth the user's GPU days.

Confirmation runs are recorded in the search state (``confirm``) and resume like the rungs; the number of
seeds is not part of the search's fingerprint, so a finished search can be confirmed afterwards.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass
from typing import Any

from ssl_hybrid.errors import UserError
from ssl_hybrid.search.halving import Scorer, SearchState, StepsFor, score_one

log = logging.getLogger(__name__)


@dataclass
class ConfirmConfig:
    # Fresh training seeds for the winner and each reference after the last rung (0 = no confirmation).
    # Each costs (1 + references) runs at the last rung's budget; 3 gives a usable interval, 5 a tight one.
    seeds: int = 0
    # The confirmation seeds are the search's seed + seed_offset + 1, + 2, ... (train.seed of those runs); the
    # rungs train with the recipe's train.seed, so keep the offset clear of it.
    seed_offset: int = 1000

    def check(self) -> None:
        if self.seeds < 0:
            raise UserError(f"search.confirm.seeds = {self.seeds}: must be >= 0 (0 = no confirmation)")


def confirm_seeds(config: ConfirmConfig, base_seed: int) -> list[int]:
    return [base_seed + config.seed_offset + 1 + i for i in range(config.seeds)]


def run_confirmation(
    state: SearchState,
    winner: str,
    seeds: list[int],
    scorer: Scorer,
    steps_for: StepsFor | None = None,
) -> dict[str, Any]:
    """Score the winner and every reference once per seed at the last rung's budget; returns the summary
    (also kept in ``state.data["confirm"]``). A re-run scores only the (design, seed) pairs still missing."""
    last = state.data["rungs"][-1]
    designs = [winner, *state.references()]
    record = state.data.setdefault("confirm", {"winner": winner, "scores": {}})
    if record["winner"] != winner:  # the search changed its mind (resumed with more rungs): start over
        record.update(winner=winner, scores={})
    for seed in seeds:
        for cid in designs:
            scores = record["scores"].setdefault(cid, {})
            if str(seed) in scores:
                continue
            candidate = state.candidate(cid)
            seconds = last.get("seconds", 0.0)
            steps = steps_for(candidate, seconds) if steps_for and seconds else last["steps"]
            planned = {"index": last["index"], "steps": steps, "seed": seed}
            scores[str(seed)] = score_one(candidate, planned, scorer)
            state.save()
    if not any(record["scores"][cid].get(str(seed), {}).get("score") is not None for cid in designs for seed in seeds):
        raise RuntimeError(f"every confirmation run failed; see the errors under 'confirm' in {state.path}")
    summary = summarize(record, winner, state.references(), seeds)
    summary["labels"] = {cid: state.candidate(cid).label() for cid in designs}
    record["summary"] = summary
    state.save()
    for line in summary_lines(summary):
        log.info("%s", line)
    return summary


def summarize(record: dict[str, Any], winner: str, references: list[str], seeds: list[int]) -> dict[str, Any]:
    """Per design: the scores by seed, mean and sd; per reference: winner − reference, paired by seed."""

    def scores_of(cid: str) -> dict[int, float]:
        by_seed = record["scores"].get(cid, {})
        return {s: by_seed[str(s)]["score"] for s in seeds if by_seed.get(str(s), {}).get("score") is not None}

    designs = {}
    for cid in [winner, *references]:
        by_seed = scores_of(cid)
        values = list(by_seed.values())
        failed = {
            str(s): record["scores"].get(cid, {}).get(str(s), {}).get("error", "not scored")
            for s in seeds
            if s not in by_seed
        }
        designs[cid] = {"scores": values, "n": len(values), "mean": _mean(values), "sd": _sd(values), "failed": failed}
    comparisons = {}
    ours = scores_of(winner)
    for ref in references:
        theirs = scores_of(ref)
        differences = [ours[s] - theirs[s] for s in seeds if s in ours and s in theirs]
        comparisons[ref] = paired_difference(differences)
    return {"seeds": list(seeds), "winner": winner, "designs": designs, "versus": comparisons}


def paired_difference(differences: list[float]) -> dict[str, Any]:
    """Mean of the per-seed differences, its sd, a 95% t-interval and a verdict."""
    n = len(differences)
    mean, sd = _mean(differences), _sd(differences)
    if n < 2 or mean is None or sd is None:
        return {"n": n, "mean": mean, "sd": sd, "ci95": None, "verdict": "too few seeds for an interval"}
    half = t_975(n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if low > 0:
        verdict = "better"
    elif high < 0:
        verdict = "worse"
    else:
        verdict = "no significant difference (the interval includes 0)"
    return {"n": n, "mean": mean, "sd": sd, "ci95": [low, high], "verdict": verdict}


def t_975(dof: int) -> float:
    """The two-sided 95% quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.975, dof))


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """Plain sentences for the log and pareto.md (scores as printed by the scorer, e.g. k-NN top-1 in [0, 1])."""
    seeds, labels = summary["seeds"], summary.get("labels", {})

    def name(cid: str) -> str:  # "cd6a1baf1 (preset resvit_tiny)"
        return f"{cid} ({labels[cid]})" if cid in labels else cid

    lines = [f"confirmation over {len(seeds)} fresh seed(s) {seeds} at the last rung's budget:"]
    for cid, design in summary["designs"].items():
        values = ", ".join(f"{v:.3f}" for v in design["scores"]) or "no score"
        failed = "".join(f"; seed {seed} failed: {error}" for seed, error in design.get("failed", {}).items())
        count = design.get("n", len(design["scores"]))
        stats = f"mean {_num(design['mean'])} ± {_num(design['sd'])} over {count} seed(s)"
        lines.append(f"  {name(cid)}: {stats} ({values}){failed}")
    for ref, diff in summary["versus"].items():
        ci = diff["ci95"]
        interval = f", 95% CI [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
        paired = f"over {diff['n']} paired seed(s): {diff['verdict']}"
        lines.append(f"  {summary['winner']} − {name(ref)}: {_num(diff['mean'], '+.3f')}{interval} {paired}")
    return lines


def markdown_section(summary: dict[str, Any]) -> str:
    return "\n## Confirmation\n\n" + "\n".join(f"- {line.strip()}" for line in summary_lines(summary)) + "\n"


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _sd(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) >= 2 else None


def _num(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)
