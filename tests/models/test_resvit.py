"""Conv-heavy hybrid (resvit_*): the timm contract, masked batch norm, masked forward with no leak, export.

Every variant runs at 64 px (a 4x4 patch grid; the 224-px position embedding is interpolated).
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from torch import nn

import ssl_hybrid.models  # noqa: F401  (registers resvit_*)
from ssl_hybrid.models import RESVIT_VARIANTS, load_backbone, save_model_folder
from ssl_hybrid.models.masking import random_grid_mask
from ssl_hybrid.models.resvit import MaskedBatchNorm2d, keep_map
from tests.models.models_helpers import RESVIT_CASES

IMG = 64
GRID = IMG // 16
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def built() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: timm.create_model(name, num_classes=NUM_CLASSES).eval() for name in RESVIT_VARIANTS}


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _mask(ratio: float = 0.75, seed: int = 0, batch: int = 4) -> torch.Tensor:
    return random_grid_mask(batch, GRID, GRID, ratio, generator=torch.Generator().manual_seed(seed))


def _trained_like(model: nn.Module) -> nn.Module:
    """A copy whose zero-initialized last BN gammas are non-zero, so every residual branch carries signal
    (at init they are exactly zero and a leak through a branch could not show)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bn2.weight"):
                param.fill_(0.5)
    return model


def test_registered_variants_sizes_and_conv_share_of_compute(built):
    assert set(timm.list_models("resvit_*")) == set(RESVIT_VARIANTS)
    millions = {name: sum(p.numel() for p in model.parameters()) / 1e6 for name, model in built.items()}
    assert millions["resvit_nano"] < 0.5
    assert 5.0 < millions["resvit_tiny"] < 7.0
    assert 15.0 < millions["resvit_small"] < 25.0
    from ssl_hybrid.models.flops import count_flops

    tiny = timm.create_model("resvit_tiny", num_classes=0, img_size=96)
    total = count_flops(tiny, (1, 3, 96, 96))
    conv_only = count_flops(tiny, (1, 3, 96, 96), forward_fn=lambda m, x: m.forward_conv(x))
    assert conv_only / total > 0.6, "the conv stages must carry most of the compute"  # 0.68 at 96 px


@pytest.mark.parametrize("name", RESVIT_CASES)
def test_shapes_and_backward_reaches_every_parameter(built, images, name):
    model = _trained_like(built[name]).train()
    feats = model.forward_features(images)
    logits = model.forward_head(feats)
    assert feats.shape == (4, 1 + GRID * GRID, model.embed_dim)
    assert model.forward_head(feats, pre_logits=True).shape == (4, model.num_features)
    assert logits.shape == (4, NUM_CLASSES) and torch.isfinite(logits).all()
    logits.pow(2).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_masked_batch_norm_equals_batch_norm_without_mask_and_uses_visible_statistics():
    torch.manual_seed(0)
    x = torch.randn(3, 8, 6, 6)
    masked, plain = MaskedBatchNorm2d(8).train(), nn.BatchNorm2d(8).train()
    ones = torch.ones(3, 1, 6, 6)
    torch.testing.assert_close(masked(x, ones), plain(x))  # all visible = plain BN, running stats included
    torch.testing.assert_close(masked.running_var, plain.running_var)
    keep = (torch.rand(3, 1, 6, 6) > 0.5).float()
    out = masked(x, keep)
    assert out[keep.expand_as(out) == 0].abs().max() == 0
    visible = out.permute(1, 0, 2, 3)[:, keep[:, 0].bool()]  # [C, visible positions]
    torch.testing.assert_close(visible.mean(dim=1), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(visible.var(dim=1, unbiased=False), torch.ones(8), atol=1e-3, rtol=0)
    masked.eval()
    torch.testing.assert_close(masked(x, keep), masked(x) * keep)


def test_keep_map_upsamples_patch_mask():
    mask = torch.tensor([[[True, False], [False, False]]])
    keep = keep_map(mask, 4, torch.float32)  # 16-px patches at stride 4 -> 4x4 cells
    assert keep.shape == (1, 1, 8, 8) and keep[0, 0, :4, :4].sum() == 0 and keep[0, 0, 4:, :].min() == 1


@pytest.mark.parametrize("name", RESVIT_CASES)
@pytest.mark.parametrize("train_mode", [False, True])
def test_changing_hidden_pixels_changes_no_masked_output(built, images, name, train_mode):
    model = _trained_like(built[name]).train(train_mode)
    mask = _mask(0.5, seed=3)
    hidden_pixels = mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None].expand_as(images)
    changed_hidden = images.clone()
    changed_hidden[hidden_pixels] = torch.randn(int(hidden_pixels.sum())) * 5
    changed_visible = images.clone()
    changed_visible[~hidden_pixels] += 1.0
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        base = model.forward_masked(images, mask)
        model.load_state_dict(state)  # same running statistics for every pass in train mode
        hidden = model.forward_masked(changed_hidden, mask)
        model.load_state_dict(state)
        visible = model.forward_masked(changed_visible, mask)
    for key in ("tokens", "fused"):
        assert torch.equal(base[key], hidden[key]), f"{key} depends on hidden pixels"
        assert not torch.allclose(base[key], visible[key])  # the test can fail: visible pixels do matter
    for level, (a, b) in enumerate(zip(base["pyramid"], hidden["pyramid"])):
        assert torch.equal(a, b), f"pyramid level {level} depends on hidden pixels"
    hidden4 = mask.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].expand_as(base["pyramid"][0][:, :1])
    assert base["pyramid"][0][:, :1][hidden4].abs().max() == 0


def test_forward_masked_contract_and_visible_only_tokens(built, images):
    model = built["resvit_tiny"]
    mask = _mask(0.75)
    with torch.no_grad():
        out = model.forward_masked(images, mask)
    assert out["tokens"].shape == out["fused"].shape == (4, 1 + GRID * GRID // 4, model.embed_dim)
    assert out["ids_restore"].shape == out["mask"].shape == (4, GRID * GRID) and out["grid"] == (GRID, GRID)
    assert [m.shape[1] for m in out["pyramid"]] == [64, 128, 256]
    with torch.no_grad():  # nothing hidden: the masked pass is the plain forward (BN in eval mode)
        none_hidden = model.forward_masked(images, torch.zeros(4, GRID, GRID, dtype=torch.bool))
        torch.testing.assert_close(none_hidden["fused"], model.forward_features(images))


@pytest.mark.parametrize("name", ["resvit_nano", "resvit_tiny"])
def test_features_only_and_forward_intermediates(built, images, name):
    features = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, -1)).eval()
    with torch.no_grad():
        maps = features(images)
    assert features.feature_info.reduction() == [4, 8, 16, 16]
    for feature, channels, reduction in zip(maps, features.feature_info.channels(), features.feature_info.reduction()):
        assert feature.shape == (4, channels, IMG // reduction, IMG // reduction)
    model = built[name]
    with torch.no_grad():
        final, inter = model.forward_intermediates(images, indices=[0, 2, -1])
        nlc = model.forward_intermediates(images, indices=[-1], output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(images))
    torch.testing.assert_close(nlc[0], inter[-1].flatten(2).transpose(1, 2))


def test_multiscale_embedding_parts_are_unit_norm_and_include_the_default_tokens(built, images):
    model = built["resvit_tiny"]
    with torch.no_grad():
        embedding = model.forward_multiscale(images)
        tokens = model.forward_features(images)
    sizes = [64, 128, 256, 256, 256]
    assert embedding.shape == (4, sum(sizes))
    parts = embedding.split(sizes, dim=1)
    for part in parts:
        torch.testing.assert_close(part.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(parts[3], nn.functional.normalize(tokens[:, 0], dim=-1))


def test_grad_checkpointing_gives_same_outputs_and_grads(built, images):
    model = _trained_like(built["resvit_nano"]).train()
    state = copy.deepcopy(model.state_dict())

    def run():
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        out = model(images)
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_out, plain_grads = run()
    model.set_grad_checkpointing(True)
    ckpt_out, ckpt_grads = run()
    torch.testing.assert_close(ckpt_out, plain_out)
    for key, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[key], grad, msg=key)


def test_layer_decay_groups_and_no_weight_decay(built):
    model = copy.deepcopy(built["resvit_tiny"])
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scale_of = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    assert len(scale_of) == len(names)
    # stem < stage 0 < stage 1 < stage 2 < tokens < block 0 < ... < head
    order = [
        "stem_conv.weight",
        "stages.0.0.conv1.weight",
        "stages.1.0.conv1.weight",
        "stages.2.0.conv1.weight",
        "patch_embed.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.3.attn.qkv.weight",
        "head.weight",
    ]
    scales = [scale_of[id(names[n])] for n in order]
    assert scales == sorted(scales) and len(set(scales)) == len(scales) and scales[-1] == 1.0


def test_export_round_trip_and_other_input_size(built, images, tmp_path):
    model = timm.create_model("resvit_nano", num_classes=0, img_size=96).eval()
    folder = save_model_folder(model, tmp_path / "m", extra={"image_size": 96})
    assert json.loads((folder / "config.json").read_text())["architecture"] == "resvit_nano"
    x = torch.randn(2, 3, 96, 96)
    loaded = load_backbone(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), model.forward_features(x), atol=0, rtol=0)
        via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        torch.testing.assert_close(via_timm.forward_features(x), model.forward_features(x), atol=0, rtol=0)
    resized = load_backbone(folder, img_size=64)  # new grid: pos_embed resampled, not rejected
    assert resized.pos_embed.shape[1] == 16 and resized.forward_features(images).shape[1] == 17


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 16"):
        timm.create_model("resvit_nano", img_size=70)
    with pytest.raises(ValueError, match="3 stages"):  # 2 stages (to stride 8) are a family option since issue 30
        timm.create_model("resvit_nano", conv_dims=(16, 32, 64, 128), conv_depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("resvit_nano", global_pool="max")
