"""Window and top-k sparse attention against dense attention, for every preset of the family."""

from __future__ import annotations

import pytest
import timm
import torch

import ssl_hybrid.models  # noqa: F401
from ssl_hybrid.models.attention import TokenLayout, attention_allowed
from ssl_hybrid.models.masking import random_grid_mask
from tests.models.models_helpers import FAMILY_CASES, GRID, IMG


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_window_covering_whole_grid_equals_global(restore, images, name):
    model = restore(name)
    mask = random_grid_mask(3, GRID, GRID, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.forward_features(images)
        reference_masked = model.forward_masked(images, mask)["fused"]
        model.set_attention("window", window_size=GRID)  # divisible: batched-window fast path
        torch.testing.assert_close(model.forward_features(images), reference, atol=2e-5, rtol=1e-4)
        model.set_attention("window", window_size=GRID + 3)  # not divisible: attention-mask path
        torch.testing.assert_close(model.forward_features(images), reference, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(model.forward_masked(images, mask)["fused"], reference_masked, atol=2e-5, rtol=1e-4)


def test_small_windows_differ_from_global_and_both_window_paths_agree(restore, images):
    model = restore("hybrid_tiny")
    with torch.no_grad():
        reference = model.forward_features(images)
        model.set_attention("window", window_size=2)
        fast = model.forward_features(images)  # 4x4 grid in 2x2 windows, batched
        all_visible = torch.zeros(3, GRID, GRID, dtype=torch.bool)
        masked_path = model.forward_masked(images, all_visible)["fused"]  # same tokens through the mask path
    assert not torch.allclose(fast, reference, atol=1e-3)
    torch.testing.assert_close(fast, masked_path, atol=2e-5, rtol=1e-4)


def test_window_allowed_pattern():
    layout = TokenLayout.for_grid(1, (4, 4), torch.device("cpu"))
    allowed = attention_allowed(layout, "window", 2)[0, 0]  # [17, 17]
    assert allowed[0].all() and allowed[:, 0].all()  # class token is global
    cell = lambda r, c: 1 + 4 * r + c  # noqa: E731
    assert allowed[cell(0, 0), cell(1, 1)] and not allowed[cell(0, 0), cell(0, 2)]
    assert int(allowed[1:, 1:].sum()) == 16 * 4  # each patch sees the 4 patches of its window


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_topk_with_all_keys_equals_global_and_fewer_keys_differ(restore, images, name):
    model = restore(name)
    with torch.no_grad():
        reference = model.forward_features(images)
        model.set_attention("topk", topk=1 + GRID * GRID)
        torch.testing.assert_close(model.forward_features(images), reference, atol=2e-5, rtol=1e-4)
        model.set_attention("topk", topk=3)
        sparse = model.forward_features(images)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, reference, atol=1e-4)


def test_attn_mode_kwarg_builds_and_rejects_unknown():
    model = timm.create_model("hybrid_nano", attn_mode="window", window_size=2).eval()
    assert all(b.attn.attn_mode == "window" for b in model.blocks)
    with torch.no_grad():
        assert model(torch.randn(1, 3, IMG, IMG)).shape == (1, 1000)
    with pytest.raises(ValueError, match="attn_mode"):
        timm.create_model("hybrid_nano", attn_mode="sparse")
