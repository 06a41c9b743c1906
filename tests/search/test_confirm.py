"""The confirmation stage (winner and presets retrained with fresh seeds, compared seed by seed) and the
leave-one-out k-NN proxy that pools every labeled image as a query."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ssl_hybrid.eval.features import extract_features
from ssl_hybrid.eval.knn import leave_one_out_knn
from ssl_hybrid.models.pooling import multiscale_embed
from ssl_hybrid.search import run as search_run
from ssl_hybrid.search.confirm import (
    ConfirmConfig,
    confirm_seeds,
    paired_difference,
    run_confirmation,
    summary_lines,
    t_975,
)
from ssl_hybrid.search.halving import HalvingSchedule, SearchState, successive_halving
from ssl_hybrid.search.proxy import KnnSets, ProxyConfig
from ssl_hybrid.search.space import build_candidate, preset_candidate, sample_candidates
from tests.search.test_split import split_space


class SeededScorer:
    """Quality per candidate plus a per-seed offset shared by every design (a lucky seed lifts all of them)."""

    def __init__(self, quality, seed_offset=None):
        self.quality, self.seed_offset, self.calls = quality, seed_offset or {}, []

    def __call__(self, candidate, steps, rung, seed=None):
        self.calls.append((candidate.id, steps, rung, seed))
        return {"score": self.quality[candidate.id] + self.seed_offset.get(seed, 0.0)}


def test_t_quantiles_match_the_printed_table():
    for dof, quantile in {1: 12.706, 2: 4.303, 11: 2.201, 30: 2.042}.items():  # any statistics textbook's t table
        assert t_975(dof) == pytest.approx(quantile, abs=1e-3)


def test_paired_difference_interval_and_verdicts():
    from scipy import stats

    differences = [0.02, 0.025, 0.03]
    result = paired_difference(differences)
    half = stats.t.ppf(0.975, 2) * np.std(differences, ddof=1) / np.sqrt(3)
    assert result["mean"] == pytest.approx(np.mean(differences))
    assert result["ci95"] == pytest.approx([np.mean(differences) - half, np.mean(differences) + half], abs=1e-4)
    assert result["verdict"] == "better"
    assert paired_difference([-0.02, -0.025, -0.03])["verdict"] == "worse"
    assert paired_difference([0.03, -0.02, 0.0])["verdict"].startswith("no significant difference")
    assert paired_difference([-0.03, 0.02, -0.01])["verdict"].startswith("no significant difference")
    assert paired_difference([0.05])["ci95"] is None


def _halved(tmp_path, quality, scorer):
    candidates = sample_candidates(split_space(), 4, seed=0)
    reference = preset_candidate("resvit_nano")
    quality.update(dict(zip([c.id for c in candidates], [0.1, 0.4, 0.3, 0.2]), **{reference.id: 0.35}))
    state = SearchState.load_or_create(tmp_path / "state.json", "fp")
    state.add_candidates([*candidates, reference])
    state.data["references"] = [reference.id]
    winner = successive_halving(state, [c.id for c in candidates], HalvingSchedule(10, 2, 2), scorer)
    return state, winner, reference.id


def test_confirmation_scores_winner_and_references_per_fresh_seed_and_resumes(tmp_path):
    quality: dict[str, float] = {}
    scorer = SeededScorer(quality, seed_offset={1001: 0.0, 1002: 0.1, 1003: -0.05})
    state, winner, reference = _halved(tmp_path, quality, scorer)
    seeds = confirm_seeds(ConfirmConfig(seeds=3), base_seed=0)
    assert seeds == [1001, 1002, 1003]
    searched = len(scorer.calls)
    summary = run_confirmation(state, winner, seeds, scorer)
    confirm_calls = scorer.calls[searched:]
    assert sorted((cid, seed) for cid, _, _, seed in confirm_calls) == sorted(
        (cid, seed) for cid in (winner, reference) for seed in seeds
    )
    assert {steps for _, steps, _, _ in confirm_calls} == {state.data["rungs"][-1]["steps"]}  # the last rung's budget
    assert summary["designs"][winner]["scores"] == pytest.approx([0.4, 0.5, 0.35])
    versus = summary["versus"][reference]
    assert versus["mean"] == pytest.approx(0.05) and versus["sd"] == pytest.approx(0.0, abs=1e-12)
    assert versus["verdict"] == "better"  # paired by seed: the shared seed luck cancels
    assert summary["labels"][reference] == "preset resvit_nano"
    assert f"{winner} − {reference} (preset resvit_nano): +0.050" in "\n".join(summary_lines(summary))
    # a re-run (interrupted or with one more seed) scores only what is missing
    state = SearchState.load_or_create(tmp_path / "state.json", "fp")
    run_confirmation(state, winner, [*seeds, 1004], scorer)
    assert [(cid, seed) for cid, _, _, seed in scorer.calls[searched + len(confirm_calls) :]] == [
        (winner, 1004),
        (reference, 1004),
    ]


def test_a_failed_confirmation_run_is_recorded_not_fatal(tmp_path):
    quality: dict[str, float] = {}
    state, winner, reference = _halved(tmp_path, quality, SeededScorer(quality))

    def flaky(candidate, steps, rung, seed=None):
        if candidate.id == reference and seed == 1002:
            raise RuntimeError("diverged")
        return {"score": quality[candidate.id]}

    summary = run_confirmation(state, winner, [1001, 1002, 1003], flaky)
    assert "diverged" in state.data["confirm"]["scores"][reference]["1002"]["error"]
    assert summary["versus"][reference]["n"] == 2  # only the seeds both designs finished are paired
    assert summary["designs"][reference]["n"] == 2 and summary["designs"][winner]["n"] == 3
    assert "seed 1002 failed: RuntimeError: diverged" in "\n".join(summary_lines(summary))


def test_confirmation_with_a_scorer_that_takes_no_seed_fails_loudly(tmp_path):
    quality: dict[str, float] = {}
    state, winner, _ = _halved(tmp_path, quality, SeededScorer(quality))

    def seedless(candidate, steps, rung):  # an injected scorer of the rungs' signature
        return {"score": quality[candidate.id]}

    with pytest.raises(RuntimeError, match="every confirmation run failed"):
        run_confirmation(state, winner, [1001, 1002], seedless)


@pytest.mark.slow
def test_confirmation_added_to_a_finished_search_reruns_nothing_else(tiny_search):
    tiny_search.space = split_space()
    tiny_search.num_candidates = 4
    tiny_search.references = ["resvit_nano"]
    tiny_search.schedule = HalvingSchedule(min_steps=2, eta=2, max_rungs=2)
    candidates = sample_candidates(tiny_search.space, 4, 0)
    quality = {c.id: 0.1 * i for i, c in enumerate(candidates)} | {preset_candidate("resvit_nano").id: 0.25}
    scorer = SeededScorer(quality)
    first = search_run.run_search(tiny_search, scorer=scorer)
    assert "confirm" not in first and "Confirmation" not in (tiny_search.out_dir() / "pareto.md").read_text()
    searched = len(scorer.calls)
    tiny_search.confirm = ConfirmConfig(seeds=2)  # not part of the fingerprint: the state resumes
    summary = search_run.run_search(tiny_search, scorer=scorer)
    assert all(seed is not None for *_, seed in scorer.calls[searched:]) and len(scorer.calls) == searched + 4
    assert summary["confirm"]["winner"] == summary["chosen"] == first["chosen"]
    assert "## Confirmation" in (tiny_search.out_dir() / "pareto.md").read_text()
    saved = json.loads((tiny_search.out_dir() / "pareto.json").read_text())
    assert saved["confirm"]["versus"][preset_candidate("resvit_nano").id]["n"] == 2


def test_leave_one_out_proxy_pools_train_and_test_and_matches_the_reference(image_folder, tmp_path, monkeypatch):
    test_folder = tmp_path / "test"
    for name in ("beta", "gamma"):  # a test folder with fewer classes: labels must follow the class names
        shutil.copytree(image_folder / name, test_folder / name)
    holdout = KnnSets(ProxyConfig(knn_train=str(image_folder), knn_test=str(test_folder)))
    assert holdout.test.classes == holdout.train.classes
    assert [holdout.test.classes[label] for label in holdout.test.labels] == ["beta"] * 6 + ["gamma"] * 6
    proxy = ProxyConfig(knn_train=str(image_folder), knn_test=str(test_folder), knn_protocol="leave_one_out", knn_k=5)
    pooled = KnnSets(proxy)
    assert len(pooled.train) == 18 + 12 and pooled.num_classes == 3
    torch.manual_seed(0)
    backbone = build_candidate(preset_candidate("resvit_nano"), 32).eval()
    widths = []

    def recording(*args, **kwargs):
        features, labels = extract_features(*args, **kwargs)
        widths.append(features.shape[1])
        return features, labels

    monkeypatch.setattr("ssl_hybrid.eval.features.extract_features", recording)
    result = pooled.evaluate(backbone, 32, proxy)
    monkeypatch.undo()
    features, labels = extract_features(backbone, pooled.loader("train", 32), forward=multiscale_embed)
    assert widths == [features.shape[1]] and features.shape[1] > backbone.num_features  # the evaluators' pooling
    assert result["n_test"] == 30 and result["top1"] == leave_one_out_knn(features, labels, k=5)["top1"]


@pytest.mark.fault(
    injected="search.proxy.knn_protocol misspelled, or leave_one_out combined with knn_shots",
    did="refuses before any image is read, naming the key and the accepted values",
    lost="nothing",
)
def test_bad_knn_protocol_is_refused(image_folder):
    with pytest.raises(search_run.UserError, match="knn_protocol = 'loo'"):
        KnnSets(ProxyConfig(knn_train=str(image_folder), knn_protocol="loo"))
    with pytest.raises(search_run.UserError, match="knn_shots needs knn_protocol=heldout"):
        KnnSets(ProxyConfig(knn_train=str(image_folder), knn_protocol="leave_one_out", knn_shots=2))


@pytest.mark.fault(injected="a search state written before proxy.pooling / proxy.knn_protocol existed (scored with the "
                            "model's own pooling on held-out queries), resumed with today's defaults",
                   did="refuses in one line saying how it was scored and the two overrides that resume it; with "
                       "them it resumes (same fingerprint as before)",
                   lost="nothing: scores of different poolings are never mixed in one table")
def test_a_search_from_before_the_pooling_option_is_refused_with_how_to_resume(tiny_search):
    import dataclasses
    import hashlib

    values = dataclasses.asdict(tiny_search)  # the fingerprint as the earlier version computed it
    for key in ("name", "output_dir", "confirm"):
        values.pop(key)
    for key in ("knn_protocol", "pooling"):
        values["proxy"].pop(key)
    earlier = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]
    tiny_search.out_dir().mkdir(parents=True)
    SearchState(tiny_search.out_dir() / "state.json", earlier).save()
    with pytest.raises(search_run.UserError, match="resume it with proxy.pooling=default proxy.knn_protocol=heldout"):
        search_run.open_state(tiny_search)
    tiny_search.proxy.pooling = "default"
    assert search_run.open_state(tiny_search).data["fingerprint"] == earlier
