"""EViT token selection (fixed keep rate and adaptive per-image compute), for every preset of the family."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import ssl_hybrid.models  # noqa: F401
from ssl_hybrid.models.attention import TokenLayout
from ssl_hybrid.models.masking import random_grid_mask
from ssl_hybrid.models.token_select import TokenSelectConfig, select_tokens, tokens_to_keep
from tests.models.models_helpers import FAMILY_CASES, GRID, HYBRID_CASES, IMG, RESVIT_CASES


def _expected_fixed_counts(num_patches: int, keep_rate: float, stages: int) -> int:
    candidates, kept = num_patches, num_patches
    for _ in range(stages):
        kept = math.ceil(keep_rate * candidates)
        candidates = kept + 1  # the fused token is a candidate at the next selection
    return kept


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_fixed_token_selection_shapes_and_reported_counts(restore, images, name):
    model = restore(name)
    model.set_token_selection(keep_rate=0.7)
    with torch.no_grad():
        feats = model.forward_features(images)
        pooled = model.forward_head(feats, pre_logits=True)
    kept = _expected_fixed_counts(GRID * GRID, 0.7, len(model.token_select_blocks))
    assert feats.shape == (3, 1 + kept + 1, model.embed_dim)
    assert model.last_tokens_kept.tolist() == [kept] * 3
    assert model.last_token_mask is None and pooled.shape == (3, model.num_features)
    assert torch.isfinite(feats).all()


# selection at block 1: every preset with 2+ blocks (resvit_nano has one; test_models_family.py covers it)
@pytest.mark.parametrize("name", HYBRID_CASES + [c for c in RESVIT_CASES if c.id != "resvit_nano"])
def test_adaptive_token_selection_pads_and_pools_only_real_tokens(restore, images, name):
    model = restore(name)
    model.set_token_selection(keep_share=0.6, blocks=(1,))
    with torch.no_grad():
        feats = model.forward_features(images)
        pooled = model.forward_head(feats, pre_logits=True)
    kept, valid = model.last_tokens_kept, model.last_token_mask
    assert kept.shape == (3,) and ((kept >= 1) & (kept <= GRID * GRID)).all()
    num_real = 1 + kept + (kept < GRID * GRID).long()  # class + kept + fused (when something was dropped)
    if valid is None:  # every image kept the same count
        assert feats.shape[1] == int(num_real[0])
    else:
        assert valid.sum(1).tolist() == num_real.tolist()
        assert feats[~valid].abs().max() == 0  # padding is zeroed
        real_mean = torch.stack([feats[i, 1:][valid[i, 1:]].mean(0) for i in range(3)])
        torch.testing.assert_close(pooled, 0.5 * (feats[:, 0] + real_mean))


def test_adaptive_counts_follow_attention_concentration():
    torch.manual_seed(0)
    B, M, C = 2, 10, 8
    x = torch.randn(B, 1 + M, C)
    cls_attn = torch.zeros(B, 1 + M)
    cls_attn[0, 1:] = torch.tensor([0.02] * 9 + [0.82])  # one token holds most attention
    cls_attn[1, 1:] = 0.1  # uniform
    layout = TokenLayout.for_grid(B, (2, 5), torch.device("cpu"))
    config = TokenSelectConfig(keep_share=0.8)
    out, new_layout, kept = select_tokens(x, cls_attn, layout, config)
    # reference: smallest k whose top-k attention share reaches 0.8
    assert kept.tolist() == [1, 8]
    assert out.shape == (B, 1 + 8 + 1, C)
    assert new_layout.valid[0].tolist() == [True, True] + [False] * 7 + [True]
    assert new_layout.valid[1].all()
    assert new_layout.pos[0, 1] == 9  # the most attended position is kept first
    torch.testing.assert_close(out[0, 1], x[0, 10])
    weights = cls_attn[0, 1:10] / cls_attn[0, 1:10].sum()  # fused = attention-weighted mean of the rest
    torch.testing.assert_close(out[0, -1], (weights[:, None] * x[0, 1:10]).sum(0))
    uniform_rest = x[1, 1:][~torch.isin(torch.arange(M), new_layout.pos[1, 1:9])].mean(0)
    torch.testing.assert_close(out[1, -1], uniform_rest)


def test_tokens_to_keep_fixed_rate_and_padding():
    scores = torch.rand(2, 10)
    valid = torch.ones(2, 10, dtype=torch.bool)
    assert tokens_to_keep(scores, valid, TokenSelectConfig(keep_rate=0.7)).tolist() == [7, 7]
    valid[1, 5:] = False
    adaptive = tokens_to_keep(scores, valid, TokenSelectConfig(keep_share=1.0))
    assert adaptive.tolist() == [10, 5]  # never more than the real tokens
    with pytest.raises(ValueError):
        TokenSelectConfig(keep_rate=0.0)


def test_token_selection_kwargs_via_timm():
    model = timm.create_model("hybrid_nano", token_keep_rate=0.5, token_select_blocks=(2,)).eval()
    with torch.no_grad():
        model(torch.randn(2, 3, IMG, IMG))
    assert model.last_tokens_kept.tolist() == [8, 8]
    with pytest.raises(ValueError, match="out of range"):
        timm.create_model("hybrid_nano", token_keep_rate=0.5, token_select_blocks=(9,))


def test_selection_is_off_in_forward_masked(restore, images):
    model = restore("hybrid_nano")
    mask = random_grid_mask(3, GRID, GRID, 0.25, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.forward_masked(images, mask)["tokens"]
        model.set_token_selection(keep_rate=0.5)
        torch.testing.assert_close(model.forward_masked(images, mask)["tokens"], reference)


def test_forward_head_after_forward_masked_ignores_an_earlier_selection_mask(restore, images):
    model = restore("hybrid_nano")
    model.set_token_selection(keep_share=0.5, blocks=(1,))
    mask = random_grid_mask(3, GRID, GRID, 0.0)
    with torch.no_grad():
        model.forward_features(images)
        fused = model.forward_masked(images, mask)["fused"]
        pooled = model.forward_head(fused, pre_logits=True)
    assert model.last_token_mask is None
    torch.testing.assert_close(pooled, 0.5 * (fused[:, 0] + fused[:, 1:].mean(1)))
