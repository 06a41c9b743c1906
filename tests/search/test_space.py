"""Search space: seeded sampling, validity, candidate ids and kwargs, recipe round-trip through load_config."""

from __future__ import annotations

import pytest

from ssl_hybrid.search.space import (
    Candidate,
    SearchSpace,
    SearchSpaceError,
    invalid_reason,
    make_candidate,
    sample_candidates,
)


def test_sampling_is_seeded_distinct_and_inside_the_space():
    space = SearchSpace()
    first = sample_candidates(space, 10, seed=3)
    again = sample_candidates(space, 10, seed=3)
    other = sample_candidates(space, 10, seed=4)
    assert [c.id for c in first] == [c.id for c in again]
    assert [c.id for c in first] != [c.id for c in other]
    assert len({c.id for c in first}) == 10
    dims = space.dimensions()
    for candidate in first:
        for name, value in candidate.as_dict().items():
            assert value in dims[name], (name, value)
        assert invalid_reason(candidate.as_dict()) is None


def test_invalid_combinations_are_never_sampled():
    space = SearchSpace(conv_type=["convnext"], embed_dim=[96, 128], num_heads=[3, 4], depth=[1], conv_widths=[[16, 32]],
                        conv_depths=[[1, 1]], attn_mode=["global"], token_keep_rate=[1.0])
    candidates = sample_candidates(space, 3, seed=0)  # valid: 96/3, 96/4, 128/4 (128/3 is not)
    assert sorted((c.as_dict()["embed_dim"], c.as_dict()["num_heads"]) for c in candidates) == \
        [(96, 3), (96, 4), (128, 4)]
    with pytest.raises(SearchSpaceError, match="only 3 distinct valid"):
        sample_candidates(space, 4, seed=0)


def test_candidate_id_is_stable_and_json_round_trips():
    choices = {"conv_type": "convnext", "conv_widths": [16, 32], "conv_depths": [1, 1], "embed_dim": 64, "depth": 2, "num_heads": 2,
               "attn_mode": "window", "window_size": 2, "token_keep_rate": 0.7}
    candidate = make_candidate("hybrid_nano", choices)
    assert candidate.id == make_candidate("hybrid_nano", dict(reversed(list(choices.items())))).id
    assert candidate.id != make_candidate("hybrid_tiny", choices).id
    assert Candidate.from_json(candidate.to_json()) == candidate
    kwargs = candidate.model_kwargs()
    assert kwargs["embed_dim"] == 64 and kwargs["attn_mode"] == "window"
    assert list(kwargs[next(k for k in kwargs if k.startswith("conv_") and "dep" not in k)]) == [16, 32]


def test_window_size_only_varies_with_window_attention():
    space = SearchSpace(conv_type=["convnext"], attn_mode=["global", "window"], window_size=[2, 3], conv_widths=[[16, 32]], conv_depths=[[1, 1]],
                        embed_dim=[64], depth=[2], num_heads=[2], token_keep_rate=[1.0])
    candidates = sample_candidates(space, 3, seed=0)  # global (one canonical window), window 2, window 3
    assert sorted((c.as_dict()["attn_mode"], c.as_dict()["window_size"]) for c in candidates) == \
        [("global", 2), ("window", 2), ("window", 3)]
    with pytest.raises(SearchSpaceError):
        sample_candidates(space, 4, seed=0)


def test_empty_dimension_is_an_error():
    with pytest.raises(SearchSpaceError, match="depth"):
        sample_candidates(SearchSpace(depth=[]), 1, seed=0)
