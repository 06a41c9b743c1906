"""Attention modes, EViT token selection, export round-trip and FLOP counting, for every variant (the attention
and selection tests for every preset of the family, ``resvit_*`` included)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import timm
import torch
from models_helpers import FAMILY_CASES, HYBRID_CASES, RESVIT_CASES

import ssl_hybrid.models  # noqa: F401
from ssl_hybrid.errors import UserError
from ssl_hybrid.models import HYBRID_VARIANTS, RESVIT_VARIANTS
from ssl_hybrid.models.attention import TokenLayout, attention_allowed
from ssl_hybrid.models.export import BackboneLoadError, load_backbone, save_model_folder
from ssl_hybrid.models.flops import count_flops
from ssl_hybrid.models.masking import random_grid_mask
from ssl_hybrid.models.token_select import TokenSelectConfig, select_tokens, tokens_to_keep

IMG = 64
GRID = IMG // 16


class _BuiltOnFirstUse(dict):
    """name -> that model (no classifier, eval mode), built when a test first asks (the large ones take seconds)."""

    def __missing__(self, name: str) -> torch.nn.Module:
        assert name in HYBRID_VARIANTS + RESVIT_VARIANTS, name
        torch.manual_seed(0)
        self[name] = timm.create_model(name, num_classes=0).eval()
        return self[name]


@pytest.fixture(scope="module")
def built() -> dict[str, torch.nn.Module]:
    return _BuiltOnFirstUse()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def restore(built):
    """Give tests a way to switch modes on the shared models and always switch back."""
    touched = []

    def use(name):
        touched.append(built[name])
        return built[name]

    yield use
    for model in touched:
        model.set_attention("global")
        model.set_token_selection(1.0, None)


# ------------------------------------------------------------------------------- attention modes

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


# ------------------------------------------------------------------------------- token selection

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


# ------------------------------------------------------------------------------- export

@pytest.mark.parametrize("name", HYBRID_CASES)
def test_export_round_trip_identical_outputs(built, images, name, tmp_path):
    model = built[name]
    folder = save_model_folder(model, tmp_path / "export", extra={"image_size": IMG, "step": 7})
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == name and config["ssl_hybrid"]["step"] == 7
    assert config["pretrained_cfg"]["input_size"] == [3, IMG, IMG]
    assert config["num_features"] == model.num_features
    assert config["model_args"] == {"num_classes": 0, "global_pool": "token_avg", "img_size": [224, 224]}
    loaded = load_backbone(folder).eval()
    with torch.no_grad():
        expected = model.forward_features(images)
        torch.testing.assert_close(loaded.forward_features(images), expected, atol=0, rtol=0)
        if name in ("hybrid_nano", "hybrid_small"):  # the timm-only path, offline (skip rebuilding base)
            via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
            torch.testing.assert_close(via_timm.forward_features(images), expected, atol=0, rtol=0)


def test_export_keeps_factory_kwargs_and_resamples_pos_embed(tmp_path):
    model = timm.create_model("hybrid_nano", img_size=96, num_classes=0, attn_mode="window", window_size=3).eval()
    save_model_folder(model, tmp_path / "m")
    loaded = load_backbone(tmp_path / "m" / "config.json")
    assert loaded.img_size == (96, 96) and loaded.attn_mode == "window" and loaded.window_size == 3
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    resized = load_backbone(tmp_path / "m", img_size=64)  # new grid: pos_embed resampled, not rejected
    assert resized.pos_embed.shape[1] == 16


def test_load_backbone_reports_missing_and_unexpected_keys(built, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = save_model_folder(built["hybrid_nano"], tmp_path / "m") / "model.safetensors"
    state = load_file(str(weights))
    state.pop("blocks.0.attn.qkv.weight")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(weights))
    with pytest.raises(BackboneLoadError, match=r"missing keys \(1\): blocks.0.attn.qkv.weight") as err:
        load_backbone(tmp_path / "m")
    assert "unexpected keys (1): extra.weight" in str(err.value) and isinstance(err.value, UserError)
    with pytest.raises(BackboneLoadError, match="not found"):
        load_backbone(tmp_path / "nowhere")


def test_model_folder_works_for_plain_timm_models(tmp_path):
    model = timm.create_model("resnet18", num_classes=0).eval()
    save_model_folder(model, tmp_path / "m", extra={"image_size": 32})
    loaded = load_backbone(tmp_path / "m")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


# ------------------------------------------------------------------------------- flops

def test_count_flops_matches_hand_count_for_linear_and_conv():
    linear = torch.nn.Linear(32, 16)
    assert count_flops(linear, (4, 32)) == 2 * 4 * 32 * 16
    # fwd + weight grad; the input needs no grad, so backward skips grad-input (as for a first layer)
    assert count_flops(linear, (4, 32), train_step=True) == 2 * 2 * 4 * 32 * 16
    conv = torch.nn.Conv2d(3, 8, 4, stride=4)
    assert count_flops(conv, (1, 3, 16, 16)) == 2 * 8 * 3 * 4 * 4 * 4 * 4


def test_count_flops_counts_depthwise_conv_backward_once_per_forward_multiply_add():
    from torch.utils.flop_counter import FlopCounterMode

    depthwise = torch.nn.Conv2d(32, 32, 7, padding=3, groups=32)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    forward = count_flops(depthwise, x)
    assert forward == 2 * 2 * 32 * 8 * 8 * 49
    assert count_flops(depthwise, x, train_step=True) == 3 * forward  # fwd + grad input + grad weight
    dense = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    with FlopCounterMode(display=False) as torch_counter:  # torch's own formula is right without groups
        dense(x).sum().backward()
    assert count_flops(dense, x, train_step=True) == torch_counter.get_total_flops()


def test_count_flops_on_hybrid_and_masking_cuts_flops(built):
    model = copy.deepcopy(built["hybrid_small"])
    x = torch.randn(1, 3, 224, 224)
    forward = count_flops(model, x)
    train = count_flops(model, x, train_step=True)
    assert 2.9 < train / forward < 3.1 and all(p.grad is None for p in model.parameters())
    mask = random_grid_mask(1, 14, 14, 0.75)
    masked = count_flops(model, x, forward_fn=lambda m, inp: m.forward_masked(inp, mask))
    assert masked < 0.4 * forward  # conv MLPs, fusion and transformer run on visible positions only
    vit = timm.create_model("vit_small_patch16_224")
    assert 0.85 < forward / count_flops(vit, x) < 1.15  # "near ViT-S/16 FLOPs"


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
