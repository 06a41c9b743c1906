"""The search end to end with an injected scorer: measured budgets reject before training, zero-cost
pruning, outputs (Pareto table/JSON/plot, a recipe load_config accepts and the trainer builds), resume."""

from __future__ import annotations

import json
import math

import pytest

from ssl_hybrid.search import run as search_run
from ssl_hybrid.search.budget import count_params
from ssl_hybrid.search.report import dominates, pareto_front
from ssl_hybrid.search.space import Candidate, build_candidate


class ArchScorer:
    """Deterministic stand-in for pretraining + k-NN: wider/deeper scores higher, more steps a bit higher."""

    def __init__(self, interrupt_after: int = -1):
        self.calls, self.interrupt_after = [], interrupt_after

    def __call__(self, candidate, steps, rung):
        if len(self.calls) == self.interrupt_after:
            raise KeyboardInterrupt
        self.calls.append((candidate.id, rung))
        c = candidate.as_dict()
        return {"score": c["embed_dim"] / 100 + c["depth"] / 10 + sum(c["conv_widths"]) / 1000 + steps * 1e-4}


def _load(tiny_search):
    return json.loads((tiny_search.out_dir() / "state.json").read_text())


@pytest.mark.slow
def test_over_budget_candidates_are_rejected_before_training(tiny_search):
    params = sorted(count_params(build_candidate(c, 32)) / 1e6 for c in
                    search_run.sample_candidates(tiny_search.space, tiny_search.num_candidates, tiny_search.seed))
    tiny_search.budget.max_params_m = params[len(params) // 2]  # about half the candidates are too big
    scorer = ArchScorer()
    summary = search_run.run_search(tiny_search, scorer=scorer)
    state = _load(tiny_search)
    rejected = {cid for cid, m in state["measurements"].items() if m["rejected"]}
    assert rejected and len(rejected) < tiny_search.num_candidates
    for cid in rejected:
        measured = state["measurements"][cid]
        assert measured["params_m"] > tiny_search.budget.max_params_m
        assert "gflops" not in measured and "latency_ms" not in measured  # stopped at the first violation
    assert not rejected & {cid for cid, _ in scorer.calls}
    assert all(state["measurements"][cid]["params_m"] <= tiny_search.budget.max_params_m for cid, _ in scorer.calls)
    rows = {r["id"]: r for r in summary["rows"]}
    assert all(rows[cid]["status"].startswith("over budget") for cid in rejected)


def test_flops_and_latency_limits(tiny_search):
    tiny_search.budget.max_gflops = 1e-9  # nothing fits
    with pytest.raises(search_run.UserError, match="over budget"):
        search_run.run_search(tiny_search, scorer=ArchScorer())
    state = _load(tiny_search)
    assert all("GFLOPs" in m["rejected"] and "latency_ms" not in m for m in state["measurements"].values())

    tiny_search.name, tiny_search.budget.max_gflops, tiny_search.budget.max_latency_ms = "lat", 0.0, 1e-6
    with pytest.raises(search_run.UserError, match="over budget"):
        search_run.run_search(tiny_search, scorer=ArchScorer())
    assert all("latency" in m["rejected"] and m["latency_ms"] > 0 for m in _load(tiny_search)["measurements"].values())


def test_measurements_match_the_counters(tiny_search):
    from ssl_hybrid.models.flops import count_flops

    tiny_search.num_candidates = 2
    search_run.run_search(tiny_search, scorer=ArchScorer())
    state = _load(tiny_search)
    for cid, payload in state["candidates"].items():
        model = build_candidate(Candidate.from_json(payload), 32)
        measured = state["measurements"][cid]
        assert measured["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
        assert measured["gflops"] == pytest.approx(count_flops(model, (1, 3, 32, 32)) / 1e9)
        assert measured["latency_ms"] > 0


@pytest.mark.slow
def test_outputs_pareto_and_chosen_recipe(tiny_search):
    from ssl_hybrid.config import load_config
    from ssl_hybrid.train.wiring import build_backbone

    summary = search_run.run_search(tiny_search, scorer=ArchScorer())
    out = tiny_search.out_dir()
    for name in ("pareto.md", "pareto.json", "pareto.png", "chosen.yaml", "state.json"):
        assert (out / name).stat().st_size > 0, name
    rows = [r for r in summary["rows"] if r["score"] is not None]
    front = {r["id"] for r in rows if r["pareto"]}
    for r in rows:  # front membership is exactly "no other row dominates it"
        dominated = any(dominates(q, r, ("latency_ms", "gflops")) for q in rows if q is not r)
        assert (r["id"] in front) == (not dominated)
    assert summary["chosen"] == max(rows, key=lambda r: (r.get("last_rung", -1), r["last_score"]))["id"]
    assert f"`{summary['chosen']}`" in (out / "pareto.md").read_text()
    from scipy.stats import spearmanr

    expected = spearmanr([r["zero_cost"] for r in rows], [r["score"] for r in rows]).statistic
    assert summary["zero_cost_spearman_vs_rung0"] == pytest.approx(expected)

    config = load_config(out / "chosen.yaml")  # what `ssl-hybrid pretrain -c chosen.yaml` does first
    chosen = Candidate.from_json(_load(tiny_search)["candidates"][summary["chosen"]])
    assert config.model.name == "hybrid_nano" and config.model.attn_mode == chosen.as_dict()["attn_mode"]
    config.data.image_size = 32
    backbone = build_backbone(config)
    assert backbone.embed_dim == chosen.as_dict()["embed_dim"] and len(backbone.blocks) == chosen.as_dict()["depth"]
    measured = _load(tiny_search)["measurements"][summary["chosen"]]["params_m"]
    assert sum(p.numel() for p in backbone.parameters()) / 1e6 == pytest.approx(measured)


@pytest.mark.slow
def test_zero_cost_pruning_drops_the_lowest_naswot(tiny_search):
    tiny_search.zero_cost.keep_fraction = 0.5
    scorer = ArchScorer()
    search_run.run_search(tiny_search, scorer=scorer)
    state = _load(tiny_search)
    accepted = [cid for cid in state["order"] if not state["measurements"][cid]["rejected"]]
    pruned = state["pruned"]
    assert len(pruned) == len(accepted) - math.ceil(len(accepted) / 2)
    kept = [cid for cid in accepted if cid not in pruned]
    assert min(state["zero_cost"][c] for c in kept) >= max(state["zero_cost"][c] for c in pruned)
    assert {cid for cid, _ in scorer.calls} == set(kept)


@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning(tiny_search, monkeypatch):
    reference = search_run.run_search(tiny_search, scorer=ArchScorer())
    reference_calls = len(_load(tiny_search)["rungs"][0]["members"]) + sum(
        len(r["members"]) for r in _load(tiny_search)["rungs"][1:])

    tiny_search.name = "interrupted"
    first = ArchScorer(interrupt_after=5)
    with pytest.raises(KeyboardInterrupt):
        search_run.run_search(tiny_search, scorer=first)
    elapsed_interrupted = _load(tiny_search)["elapsed_seconds"]
    measured = []
    real_measure = search_run.measure_and_check
    monkeypatch.setattr(search_run, "measure_and_check", lambda *a, **k: measured.append(1) or real_measure(*a, **k))
    second = ArchScorer()
    resumed = search_run.run_search(tiny_search, scorer=second)
    assert not measured  # every candidate was measured before the interruption
    assert not set(first.calls) & set(second.calls)
    assert len(first.calls) + len(second.calls) == reference_calls
    assert resumed["chosen"] == reference["chosen"]
    assert 0 < elapsed_interrupted < resumed["seconds_all_invocations"]  # time before the interruption counts
    assert resumed["seconds"] < resumed["seconds_all_invocations"]

    third = ArchScorer()  # a finished search re-run only rewrites its outputs
    search_run.run_search(tiny_search, scorer=third)
    assert third.calls == []


def test_pareto_front_by_hand():
    points = [{"id": "a", "score": 0.5, "latency_ms": 1.0, "gflops": 1.0},
              {"id": "b", "score": 0.6, "latency_ms": 2.0, "gflops": 1.0},
              {"id": "c", "score": 0.4, "latency_ms": 2.0, "gflops": 2.0},   # dominated by a
              {"id": "d", "score": 0.6, "latency_ms": 2.0, "gflops": 1.0}]   # ties b: neither dominates
    assert pareto_front(points) == ["a", "b", "d"]
    assert pareto_front(points, ("latency_ms",)) == ["a", "b", "d"]


def test_search_config_is_strict(tmp_path):
    from ssl_hybrid.errors import ConfigError

    path = tmp_path / "s.yaml"
    path.write_text("num_candidates: 4\nspace:\n  depth: [1, 2]\nschedule:\n  eta: 2\n")
    config = search_run.load_search_config(path, ["budget.max_params_m=1.5"])
    assert config.num_candidates == 4 and config.space.depth == [1, 2] and config.budget.max_params_m == 1.5
    path.write_text("space:\n  depht: [1]\n")
    with pytest.raises(ConfigError, match="depht"):
        search_run.load_search_config(path)
    with pytest.raises(ConfigError, match="image_size"):
        search_run.load_search_config(None, ["image_size=30"])


def test_model_arch_config_field(tmp_path):
    """model.arch (the searched architecture in a recipe) takes free-form kwargs but not ones with their own key."""
    from ssl_hybrid.config import from_dict, load_config, to_dict
    from ssl_hybrid.errors import ConfigError

    config = load_config(None, ["model.name=hybrid_nano", "model.arch.depth=3", "model.arch.conv_dims=[8,16]"])
    assert config.model.arch == {"depth": 3, "conv_dims": [8, 16]}
    assert from_dict(to_dict(config)).model.arch == config.model.arch  # checkpoints round-trip it
    with pytest.raises(ConfigError, match="model.arch"):
        load_config(None, ["model.arch.attn_mode=window"])
