"""The search across the conv/transformer split: conv stage types, presets as reference points scored at the
same budget, and budgets in pretraining seconds (each candidate's steps from its own measured step time)."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from ssl_hybrid.search import run as search_run
from ssl_hybrid.search.budget import count_params
from ssl_hybrid.search.halving import HalvingSchedule, SearchState, successive_halving
from ssl_hybrid.search.space import (
    Candidate,
    SearchSpace,
    SearchSpaceError,
    build_candidate,
    constructor_args,
    invalid_reason,
    preset_candidate,
    sample_candidates,
)


def split_space(**changes) -> SearchSpace:
    values = dict(preset_size="nano", conv_type=["resnet", "convnext"], conv_widths=[[8, 16, 32], [8, 16]],
                  conv_depths=[[1, 1, 1], [1, 1]], resnet_stages=[2, 3], convnext_stages=[2, 3], embed_dim=[32, 64], depth=[1, 2], num_heads=[2],
                  attn_mode=["global"], window_size=[1], token_keep_rate=[1.0])
    return SearchSpace(**dict(values, **changes))


def test_candidates_span_both_conv_types_and_build_as_their_family():
    candidates = sample_candidates(split_space(), 6, seed=0)
    types = [c.as_dict()["conv_type"] for c in candidates]
    assert types.count("resnet") == types.count("convnext") == 3  # the types take turns
    for candidate in candidates:
        model = build_candidate(candidate, 32)
        choices = candidate.as_dict()
        stages = len(choices["conv_widths"])
        conv_info = model.feature_info[:stages]
        assert [i["num_chs"] for i in conv_info] == choices["conv_widths"]
        assert [i["reduction"] for i in conv_info] == [4, 8, 16][:stages]
        assert len(model.feature_info) == stages + choices["depth"] and model.embed_dim == choices["embed_dim"]
        assert model.conv_stages == choices["conv_type"]
        batch_norm = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        if choices["conv_type"] == "resnet":
            assert candidate.base == "resvit_nano" and batch_norm
            assert model.stem_conv.out_channels == choices["conv_widths"][0]  # ResNet's stem = first stage's width
        else:
            assert candidate.base == "hybrid_nano" and not batch_norm


def test_stage_counts_per_conv_type_and_the_models_own_refusals():
    choices = dict(conv_type="resnet", conv_widths=[8, 16], conv_depths=[1, 1], embed_dim=32, depth=2, num_heads=2,
                   attn_mode="global", window_size=1, token_keep_rate=1.0)
    assert invalid_reason(choices, "nano", stages=(3,)) == "conv_type resnet takes 3 conv stages here, got 2"
    assert invalid_reason(choices, "nano") is None  # the constructor builds 2 or 3 stages of either type
    two_stage = sample_candidates(split_space(conv_type=["resnet"], conv_widths=[[8, 16]], conv_depths=[[1, 1]]), 1, 0)
    model = build_candidate(two_stage[0], 32)
    assert model.conv_stages == "resnet" and [i["reduction"] for i in model.feature_info[:2]] == [4, 8]
    assert "window_size" in invalid_reason(dict(choices, attn_mode="window", window_size=0), "nano")  # the model's rule
    with pytest.raises(SearchSpaceError, match="resnet needs conv_widths and conv_depths of 3 stages"):
        sample_candidates(split_space(resnet_stages=[3], conv_widths=[[8, 16]], conv_depths=[[1, 1]]), 1, seed=0)
    with pytest.raises(SearchSpaceError, match=r"convnext_stages = \[4\]"):
        sample_candidates(split_space(convnext_stages=[4]), 1, seed=0)
    with pytest.raises(SearchSpaceError, match="conv_type vgg unknown"):
        sample_candidates(split_space(conv_type=["vgg"]), 1, seed=0)


@pytest.mark.parametrize("name, value", [("token_keep_rate", 0.5), ("attn_mode", "window")])
def test_a_feature_reaches_the_model_or_is_refused_never_dropped(name, value):
    """Refused exactly when the family's constructor lacks the argument; when it has it, the model runs with it."""
    choices = dict(conv_type="resnet", conv_widths=[8, 16, 32], conv_depths=[1, 1, 1], embed_dim=32, depth=2,
                   num_heads=2, attn_mode="global", window_size=1, token_keep_rate=1.0)
    choices[name] = value
    reason = invalid_reason(choices, "nano")
    space = split_space(conv_type=["resnet"], **{name: [value]})
    if name not in constructor_args("resvit_nano"):
        assert reason == f"conv_type resnet (resvit_*) does not support {name}={value}"
        with pytest.raises(SearchSpaceError, match=f"does not support {name}"):
            sample_candidates(space, 1, seed=0)
        return
    assert reason is None
    candidate = sample_candidates(space, 1, seed=0)[0]
    assert candidate.model_kwargs()[name] == value
    model = build_candidate(candidate, 64).eval()
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(2, 3, 64, 64))
    if name == "attn_mode":
        assert model.attn_mode == "window" and tokens.shape[1] == 1 + 16
    else:
        assert tokens.shape[1] < 1 + 16  # half the 4x4 patch tokens dropped after the first block


def test_a_preset_reference_is_the_registered_model():
    preset = preset_candidate("resvit_nano")
    assert preset.preset and preset.label() == "preset resvit_nano" and preset.model_kwargs() == {}
    assert Candidate.from_json(json.loads(json.dumps(preset.to_json()))) == preset
    assert preset.id != preset_candidate("hybrid_nano").id
    reference = timm.create_model("resvit_nano", pretrained=False, num_classes=0, img_size=32)
    assert count_params(build_candidate(preset, 32)) == count_params(reference)
    with pytest.raises(SearchSpaceError, match="not a preset"):
        preset_candidate("resnet18")


class QualityScorer:
    """Score = a fixed quality per candidate + a small bonus per step."""

    def __init__(self, quality):
        self.quality, self.calls = quality, []

    def __call__(self, candidate, steps, rung):
        self.calls.append((candidate.id, steps, rung))
        return {"score": self.quality[candidate.id] + steps * 1e-4}


def test_references_are_scored_in_every_rung_but_never_promoted_or_chosen(tmp_path):
    candidates = sample_candidates(split_space(), 4, seed=0)
    reference = preset_candidate("resvit_nano")
    quality = dict(zip([c.id for c in candidates], [0.1, 0.4, 0.3, 0.2]), **{reference.id: 0.9})
    state = SearchState.load_or_create(tmp_path / "state.json", "fp")
    state.add_candidates([*candidates, reference])
    state.data["references"] = [reference.id]
    scorer = QualityScorer(quality)
    winner = successive_halving(state, [c.id for c in candidates], HalvingSchedule(10, 2, 2), scorer)
    rungs = state.data["rungs"]
    assert [sorted(r["scores"]) for r in rungs] == [sorted([*quality]), sorted([candidates[1].id, candidates[2].id,
                                                                                reference.id])]
    assert reference.id not in rungs[0]["promoted"] and winner == candidates[1].id  # the best searched one


def test_time_budget_gives_each_candidate_its_own_steps_calibrated_once(tmp_path):
    candidates = sample_candidates(split_space(), 4, seed=0)
    per_step = dict(zip([c.id for c in candidates], [0.5, 1.0, 2.0, 4.0]))
    timed = []

    def step_seconds(candidate):
        timed.append(candidate.id)
        return per_step[candidate.id]

    state = SearchState.load_or_create(tmp_path / "state.json", "fp")
    state.add_candidates(candidates)
    scorer = QualityScorer({c.id: 1.0 - per_step[c.id] / 10 for c in candidates})
    schedule = HalvingSchedule(min_steps=1, eta=2, max_rungs=2, min_seconds=20)
    winner = successive_halving(state, list(per_step), schedule, scorer, search_run.steps_for_seconds(state, step_seconds))
    assert sorted(timed) == sorted(per_step)  # each candidate timed once, reused in rung 1
    for cid, steps, rung in scorer.calls:
        assert steps == round(20 * 2**rung / per_step[cid])  # equal pretraining time, unequal steps
    assert state.data["rungs"][1]["seconds"] == 40 and winner == candidates[0].id
    assert state.data["rungs"][0]["scores"][candidates[3].id]["steps"] == 5
    with pytest.raises(ValueError, match="steps_for"):
        successive_halving(state, list(per_step), schedule, scorer)


@pytest.mark.slow
def test_search_with_presets_and_a_time_budget_end_to_end(tiny_search):
    tiny_search.space = split_space()
    tiny_search.num_candidates = 4
    tiny_search.references = ["resvit_nano"]
    tiny_search.budget.max_params_m = 1e-3  # every searched candidate is over: the run must refuse, not score presets only
    with pytest.raises(search_run.UserError, match="over budget"):
        search_run.run_search(tiny_search, scorer=QualityScorer({}), step_seconds=lambda c: 1.0)
    tiny_search.budget.max_params_m = 0.1
    tiny_search.name, tiny_search.schedule = "timed", HalvingSchedule(min_steps=1, eta=2, max_rungs=2, min_seconds=6)
    candidates = sample_candidates(tiny_search.space, 4, 0)
    reference = preset_candidate("resvit_nano")
    scorer = QualityScorer({c.id: 0.5 for c in [*candidates, reference]})
    summary = search_run.run_search(tiny_search, scorer=scorer, step_seconds=lambda c: 2.0 if c.preset else 1.0)
    rows = {r["id"]: r for r in summary["rows"]}
    assert rows[reference.id]["reference"] and rows[reference.id]["status"].startswith("reference")
    assert rows[reference.id]["params_m"] > 0.1  # over the limit yet measured and scored: a reference
    assert not rows[reference.id]["pareto"] and summary["chosen"] != reference.id
    assert {(cid, steps) for cid, steps, rung in scorer.calls if cid == reference.id} == {(reference.id, 3),
                                                                                          (reference.id, 6)}
    table = (tiny_search.out_dir() / "pareto.md").read_text()
    assert "| R |" in table and "preset resvit_nano" in table
    assert (tiny_search.out_dir() / "pareto.png").stat().st_size > 0


@pytest.mark.fault(injected="a search space in which a listed conv type can build nothing (resnet_stages: [3] but only "
                            "2-stage conv widths), or a conv type the family does not have",
                   did="stops before measuring or writing anything: one line naming the conv type and what it needs",
                   lost="nothing")
def test_a_space_that_cannot_build_a_conv_type_is_refused_before_anything_runs(tiny_search):
    tiny_search.space = split_space(resnet_stages=[3], conv_widths=[[8, 16]], conv_depths=[[1, 1]])
    with pytest.raises(search_run.UserError, match="conv_type resnet needs conv_widths and conv_depths of 3 stages"):
        search_run.run_search(tiny_search, scorer=QualityScorer({}))
    tiny_search.space = split_space(conv_type=["resnet", "vgg"])
    with pytest.raises(search_run.UserError, match="conv_type vgg unknown"):
        search_run.run_search(tiny_search, scorer=QualityScorer({}))
    assert not (tiny_search.out_dir() / "state.json").exists()
