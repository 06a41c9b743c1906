"""Successive halving (Jamieson & Talwalkar 2016) with a resumable JSON state.

Rung 0 scores every surviving candidate with ``min_steps`` of pretraining (or, with ``min_seconds``, the
same pretraining *time* for every candidate: its steps are that time over its measured seconds per step);
each next rung keeps the best ``1/eta`` of the previous one and multiplies the budget by ``eta``, so most
candidates get little and the best get the most. Reference points (named presets) are scored in every rung
with the same budget but take no promotion slot and are never the winner: they show what the search beat.
A promoted candidate is retrained from scratch at the larger budget rather than continued: the trainer's
lr / EMA / teacher-temperature schedules are cosine over the run's total steps, so a 50-step run is not the
first part of a 150-step run.

The state is one JSON file, rewritten atomically (temp file + rename) after every scored candidate and
every promotion. A re-run loads it, skips every (candidate, rung) already scored and continues; a state
written under a different search configuration is refused rather than silently mixed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl_hybrid.errors import UserError
from ssl_hybrid.runs import write_json_atomic
from ssl_hybrid.search.space import Candidate

log = logging.getLogger(__name__)

STATE_VERSION = 1

# scorer(candidate, steps, rung_index) -> {"score": float (higher is better), ...anything JSON-able}; the
# confirmation stage also passes seed=<training seed> (search/confirm.py)
Scorer = Callable[..., dict[str, Any]]
# steps_for(candidate, seconds) -> the steps that make ``seconds`` of pretraining for this candidate
StepsFor = Callable[[Candidate, float], int]


class SearchStateError(UserError):
    """A state file that cannot be resumed (another configuration, unreadable)."""


@dataclass
class HalvingSchedule:
    # Pretraining steps per candidate in the first rung (used when min_seconds is 0).
    min_steps: int = 50
    # Keep the best 1/eta of each rung and give them eta times the steps (3 is Hyperband's default).
    eta: int = 3
    # At most this many rungs (the last one may still hold several candidates).
    max_rungs: int = 3
    # Pretraining seconds per candidate in the first rung (0 = count in steps). Each candidate's steps are
    # this time over its seconds per step measured on this machine (CPU time of the proxy process: wall
    # time with one thread on a machine of your own, robust to other jobs on a shared one), so a cheaper
    # design trains more steps: candidates are compared at equal pretraining time on this machine.
    min_seconds: float = 0.0

    def check(self) -> None:
        if self.min_steps < 1:
            raise UserError(f"search.schedule.min_steps = {self.min_steps}: must be >= 1")
        if self.eta < 2:
            raise UserError(f"search.schedule.eta = {self.eta}: must be >= 2")
        if self.max_rungs < 1:
            raise UserError(f"search.schedule.max_rungs = {self.max_rungs}: must be >= 1")
        if self.min_seconds < 0:
            raise UserError(f"search.schedule.min_seconds = {self.min_seconds}: must be >= 0 (0 = count in steps)")


def rung_plan(num_candidates: int, schedule: HalvingSchedule) -> list[dict[str, int]]:
    """[{"index", "size", "steps", "seconds"}, ...]: rung r holds floor(n / eta^r) candidates (at least 1)
    trained for min_steps * eta^r steps (with min_seconds: for "seconds" = min_seconds * eta^r seconds);
    it ends at one candidate or at max_rungs."""
    plan = []
    size, steps = num_candidates, schedule.min_steps
    for index in range(schedule.max_rungs):
        if size < 1:
            break
        plan.append({"index": index, "size": size, "steps": steps})
        if schedule.min_seconds:
            plan[-1]["seconds"] = schedule.min_seconds * schedule.eta**index
        if size == 1:
            break
        size, steps = max(1, size // schedule.eta), steps * schedule.eta
    return plan


def total_steps(plan: list[dict[str, int]]) -> int:
    return sum(rung["size"] * rung["steps"] for rung in plan)


def rank(scores: dict[str, dict[str, Any]]) -> list[str]:
    """Candidate ids best first; failed candidates (score None) last; ties broken by id (deterministic)."""

    def key(cid: str) -> tuple:
        score = scores[cid].get("score")
        if score is None or not math.isfinite(score):
            return (1, 0.0, cid)
        return (0, -score, cid)

    return sorted(scores, key=key)


class SearchState:
    """Everything a search has decided so far; ``save`` after every change."""

    def __init__(self, path: Path, fingerprint: str, payload: dict[str, Any] | None = None):
        self.path = Path(path)
        # Wall time spent on this search over all invocations, up to the last save (interruptions included).
        self._clock, self._elapsed_before = time.perf_counter(), (payload or {}).get("elapsed_seconds", 0.0)
        self.data: dict[str, Any] = payload or {
            "version": STATE_VERSION,
            "fingerprint": fingerprint,
            "status": "running",
            "candidates": {},
            "order": [],
            "measurements": {},
            "zero_cost": {},
            "pruned": [],
            "references": [],
            "step_seconds": {},
            "rungs": [],
        }

    # -- persistence ---------------------------------------------------------------------------

    @classmethod
    def load_or_create(cls, path: Path, fingerprint: str) -> SearchState:
        path = Path(path)
        if not path.exists():
            return cls(path, fingerprint)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise SearchStateError(f"{path}: unreadable search state ({err.msg}); delete it to start over") from None
        if payload.get("fingerprint") != fingerprint:
            raise SearchStateError(
                f"{path}: this state belongs to a search with another configuration; "
                "use a new output directory, or delete the state to start over"
            )
        log.info("resuming search from %s", path)
        return cls(path, fingerprint, payload)

    def save(self) -> None:
        self.data["elapsed_seconds"] = self.elapsed_seconds()
        write_json_atomic(self.path, self.data)

    def elapsed_seconds(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._clock

    # -- candidates and measurements -----------------------------------------------------------

    def add_candidates(self, candidates: list[Candidate]) -> None:
        for candidate in candidates:
            if candidate.id not in self.data["candidates"]:
                self.data["candidates"][candidate.id] = candidate.to_json()
                self.data["order"].append(candidate.id)

    def candidate(self, cid: str) -> Candidate:
        return Candidate.from_json(self.data["candidates"][cid])

    def candidates(self) -> list[Candidate]:
        return [self.candidate(cid) for cid in self.data["order"]]

    def measurement(self, cid: str) -> dict[str, Any] | None:
        return self.data["measurements"].get(cid)

    def record_measurement(self, cid: str, measurement: dict[str, Any]) -> None:
        self.data["measurements"][cid] = measurement
        self.save()

    def accepted(self) -> list[str]:
        """Measured and within budget, in sample order."""
        return [
            cid
            for cid in self.data["order"]
            if cid in self.data["measurements"] and not self.data["measurements"][cid].get("rejected")
        ]

    # -- rungs ---------------------------------------------------------------------------------

    def rung(self, index: int) -> dict[str, Any] | None:
        rungs = self.data["rungs"]
        return rungs[index] if index < len(rungs) else None

    def open_rung(self, index: int, steps: int, members: list[str], seconds: float = 0.0) -> dict[str, Any]:
        existing = self.rung(index)
        if existing is not None:
            return existing
        rung = {
            "index": index,
            "steps": steps,
            "seconds": seconds,
            "members": list(members),
            "scores": {},
            "promoted": None,
        }
        self.data["rungs"].append(rung)
        self.save()
        return rung

    def record_score(self, index: int, cid: str, result: dict[str, Any]) -> None:
        self.data["rungs"][index]["scores"][cid] = result
        self.save()

    def close_rung(self, index: int, promoted: list[str]) -> None:
        self.data["rungs"][index]["promoted"] = list(promoted)
        self.save()

    def references(self) -> list[str]:
        return list(self.data.get("references", []))

    def best(self) -> str | None:
        """The winner: the best-scored searched candidate (not a reference) of the highest rung that has one."""
        for rung in reversed(self.data["rungs"]):
            ranked = [
                cid
                for cid in rank(rung["scores"])
                if rung["scores"][cid].get("score") is not None and cid not in self.references()
            ]
            if ranked:
                return ranked[0]
        return None


def successive_halving(
    state: SearchState,
    members: list[str],
    schedule: HalvingSchedule,
    scorer: Scorer,
    steps_for: StepsFor | None = None,
) -> str | None:
    """Run (or continue) the rungs over ``members`` (plus ``state.references()`` in every rung); returns the
    winner's id. ``steps_for`` turns a rung's seconds into a candidate's steps (needed with min_seconds).

    A candidate whose scorer raises is recorded with ``score: None`` and the error, and is not promoted;
    errors the user must fix (``UserError``: bad data path, bad recipe) stop the search at once.
    """
    if schedule.min_seconds and steps_for is None:
        raise ValueError("schedule.min_seconds needs steps_for (each candidate's seconds per step)")
    references = state.references()
    plan = rung_plan(len(members), schedule)
    budget = "seconds" if schedule.min_seconds else "steps"
    log.info(
        "successive halving: %s%s",
        ", ".join(f"rung {r['index']}: {r['size']} x {r.get(budget, 0):g} {budget}" for r in plan),
        f", + {len(references)} reference(s) in every rung" if references else "",
    )
    for planned in plan:
        seconds = planned.get("seconds", 0.0)
        rung = state.open_rung(planned["index"], planned["steps"], [*members, *references], seconds)
        for cid in rung["members"]:
            if cid in rung["scores"]:
                continue  # scored before an interruption: never re-run
            candidate = state.candidate(cid)
            steps = steps_for(candidate, seconds) if steps_for and seconds else planned["steps"]
            state.record_score(planned["index"], cid, score_one(candidate, dict(planned, steps=steps), scorer))
        if not any(r.get("score") is not None for r in rung["scores"].values()):
            raise RuntimeError(f"every candidate of rung {planned['index']} failed; see the errors in {state.path}")
        next_size = plan[planned["index"] + 1]["size"] if planned["index"] + 1 < len(plan) else 0
        ranked = [
            cid
            for cid in rank(rung["scores"])
            if rung["scores"][cid].get("score") is not None and cid not in references
        ]
        members = ranked[:next_size]
        if rung["promoted"] is None:
            state.close_rung(planned["index"], members)
        else:
            members = rung["promoted"]
    state.data["status"] = "done"
    state.save()
    return state.best()


def score_one(candidate: Candidate, planned: dict[str, Any], scorer: Scorer) -> dict[str, Any]:
    """``scorer`` on one candidate with ``planned["steps"]`` (and ``planned["seed"]`` when given); a failure
    is recorded as ``score: None`` with the error, except errors the user must fix."""
    seed = planned.get("seed")
    where = f"rung {planned['index']}" + (f" seed {seed}" if seed is not None else "")
    log.info("%s: scoring %s (%s) with %d steps", where, candidate.id, candidate.label(), planned["steps"])
    try:
        if seed is None:
            result = dict(scorer(candidate, planned["steps"], planned["index"]))
        else:
            result = dict(scorer(candidate, planned["steps"], planned["index"], seed=seed))
    except UserError:
        raise
    except Exception as err:  # a candidate that diverges or runs out of memory must not end the search
        log.exception("candidate %s failed at %s", candidate.id, where)
        return {"score": None, "error": f"{type(err).__name__}: {err}"}
    result.setdefault("steps", planned["steps"])
    score = result.get("score")
    if score is None or not math.isfinite(float(score)):
        return dict(result, score=None, error=result.get("error") or f"non-finite score {score!r}")
    result["score"] = float(score)
    log.info("%s: %s scored %.4f", where, candidate.id, result["score"])
    return result
