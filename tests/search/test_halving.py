"""Successive-halving bookkeeping with an injected deterministic scorer: rung sizes and budgets, who is
promoted, failure handling, and resume after an interruption (nothing scored twice)."""

from __future__ import annotations

import json

import pytest

from ssl_hybrid.search.halving import (
    HalvingSchedule,
    SearchState,
    SearchStateError,
    rank,
    rung_plan,
    successive_halving,
    total_steps,
)
from ssl_hybrid.search.space import SearchSpace, sample_candidates


def test_rung_plan_sizes_and_budgets():
    schedule = HalvingSchedule(min_steps=10, eta=3, max_rungs=5)
    assert rung_plan(9, schedule) == [{"index": 0, "size": 9, "steps": 10}, {"index": 1, "size": 3, "steps": 30},
                                      {"index": 2, "size": 1, "steps": 90}]
    assert rung_plan(10, HalvingSchedule(10, 2, 2)) == [{"index": 0, "size": 10, "steps": 10},
                                                        {"index": 1, "size": 5, "steps": 20}]
    assert rung_plan(2, HalvingSchedule(5, 3, 3)) == [{"index": 0, "size": 2, "steps": 5},
                                                      {"index": 1, "size": 1, "steps": 15}]
    assert rung_plan(1, schedule) == [{"index": 0, "size": 1, "steps": 10}]
    assert total_steps(rung_plan(9, schedule)) == 9 * 10 + 3 * 30 + 90


def test_rank_puts_failures_last_and_breaks_ties_by_id():
    scores = {"b": {"score": 0.5}, "a": {"score": 0.5}, "c": {"score": None}, "d": {"score": 0.9}}
    assert rank(scores) == ["d", "a", "b", "c"]


class TableScorer:
    """Score = a fixed per-candidate quality plus a small bonus per step (more steps, better score)."""

    def __init__(self, quality: dict[str, float], interrupt_after: int = -1, fail: tuple = ()):
        self.quality, self.calls, self.interrupt_after, self.fail = quality, [], interrupt_after, fail

    def __call__(self, candidate, steps, rung):
        if len(self.calls) == self.interrupt_after:
            raise KeyboardInterrupt  # what Ctrl-C or a preemption looks like to the search loop
        self.calls.append((candidate.id, steps, rung))
        if candidate.id in self.fail:
            raise RuntimeError("loss is nan")
        return {"score": self.quality[candidate.id] + steps * 1e-4, "steps_seen": steps}


@pytest.fixture
def nine():
    candidates = sample_candidates(SearchSpace(), 9, seed=0)
    quality = {c.id: q for c, q in zip(candidates, [0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6, 0.5])}
    return candidates, quality


def _state(tmp_path, candidates, fingerprint="fp"):
    state = SearchState.load_or_create(tmp_path / "state.json", fingerprint)
    state.add_candidates(candidates)
    return state


def test_promotions_follow_the_scores(tmp_path, nine):
    candidates, quality = nine
    scorer = TableScorer(quality)
    state = _state(tmp_path, candidates)
    ids = [c.id for c in candidates]
    winner = successive_halving(state, ids, HalvingSchedule(min_steps=10, eta=3, max_rungs=3), scorer)
    by_quality = sorted(ids, key=lambda cid: -quality[cid])
    rungs = state.data["rungs"]
    assert [len(r["members"]) for r in rungs] == [9, 3, 1]
    assert [r["steps"] for r in rungs] == [10, 30, 90]
    assert rungs[0]["promoted"] == by_quality[:3]
    assert rungs[1]["promoted"] == by_quality[:1]
    assert winner == by_quality[0]
    assert len(scorer.calls) == 9 + 3 + 1
    assert all(steps == {0: 10, 1: 30, 2: 90}[rung] for _, steps, rung in scorer.calls)
    on_disk = json.loads((tmp_path / "state.json").read_text())
    assert on_disk["status"] == "done" and on_disk["rungs"][2]["scores"][winner]["steps_seen"] == 90


def test_a_failing_candidate_is_recorded_and_not_promoted(tmp_path, nine):
    candidates, quality = nine
    best = max(quality, key=quality.get)
    scorer = TableScorer(quality, fail=(best,))
    state = _state(tmp_path, candidates)
    winner = successive_halving(state, [c.id for c in candidates], HalvingSchedule(10, 3, 2), scorer)
    rung0 = state.data["rungs"][0]
    assert rung0["scores"][best]["score"] is None and "nan" in rung0["scores"][best]["error"]
    assert best not in rung0["promoted"] and winner != best


def test_interrupted_search_resumes_without_rescoring(tmp_path, nine):
    candidates, quality = nine
    ids = [c.id for c in candidates]
    schedule = HalvingSchedule(min_steps=10, eta=3, max_rungs=3)
    reference_state = _state(tmp_path / "ref", candidates)
    reference = successive_halving(reference_state, ids, schedule, TableScorer(quality))

    first = TableScorer(quality, interrupt_after=10)  # all of rung 0 and the first candidate of rung 1
    with pytest.raises(KeyboardInterrupt):
        successive_halving(_state(tmp_path, candidates), ids, schedule, first)
    resumed_scorer = TableScorer(quality)
    resumed = SearchState.load_or_create(tmp_path / "state.json", "fp")  # a fresh process reads the file
    winner = successive_halving(resumed, ids, schedule, resumed_scorer)
    done_before = set(first.calls)
    assert len(first.calls) == 10 and not done_before & set(resumed_scorer.calls)
    assert len(first.calls) + len(resumed_scorer.calls) == 9 + 3 + 1
    assert winner == reference
    assert resumed.data["rungs"] == reference_state.data["rungs"]


def test_state_of_another_configuration_is_refused(tmp_path, nine):
    state = _state(tmp_path, nine[0], fingerprint="one")
    state.save()
    with pytest.raises(SearchStateError, match="another configuration"):
        SearchState.load_or_create(tmp_path / "state.json", "two")
    (tmp_path / "state.json").write_text("{trunc")
    with pytest.raises(SearchStateError, match="unreadable"):
        SearchState.load_or_create(tmp_path / "state.json", "one")
