"""Hybrid backbone: the timm contract, masked forward (no leak), attention modes, for every variant.

Every variant runs at 64 px (a 4x4 patch grid; the default 224-px position embedding is
interpolated), so even hybrid_base costs well under a second per forward. Each variant is built
once per module (``built``); tests that change a model work on a copy or restore it.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time

import pytest
import timm
import torch

import ssl_hybrid.models  # noqa: F401  (registers hybrid_*)
from ssl_hybrid.models import HYBRID_VARIANTS
from ssl_hybrid.models.masking import random_grid_mask
from tests.models.models_helpers import HYBRID_CASES

IMG = 64
GRID = IMG // 16
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def built() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: timm.create_model(name, num_classes=NUM_CLASSES).eval() for name in HYBRID_VARIANTS}


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _mask(ratio: float = 0.75, seed: int = 0, batch: int = 2) -> torch.Tensor:
    return random_grid_mask(batch, GRID, GRID, ratio, generator=torch.Generator().manual_seed(seed))


def test_every_registered_hybrid_is_tested_and_sizes_match_the_names(built):
    assert set(timm.list_models("hybrid_*")) == set(HYBRID_VARIANTS)
    millions = {name: sum(p.numel() for p in model.parameters()) / 1e6 for name, model in built.items()}
    assert millions["hybrid_nano"] < 1.0
    assert 5.0 < millions["hybrid_tiny"] < 7.0
    assert 19.0 < millions["hybrid_small"] < 24.0
    assert 80.0 < millions["hybrid_base"] < 92.0
    for model in built.values():
        assert model.patch_size == 16 and model.num_features == model.embed_dim
        assert model.default_cfg["architecture"] == model.pretrained_cfg["architecture"]


@pytest.mark.parametrize("name", HYBRID_CASES)
def test_shapes_no_nan_and_backward_reaches_every_parameter(built, images, name):
    model = built[name]
    model.train()
    try:
        feats = model.forward_features(images)
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
        assert feats.shape == (2, 1 + GRID * GRID, model.embed_dim)
        assert pooled.shape == (2, model.num_features) and logits.shape == (2, NUM_CLASSES)
        assert torch.isfinite(logits).all() and torch.isfinite(feats).all()
        model.zero_grad(set_to_none=True)
        logits.pow(2).sum().backward()
        no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not no_grad, f"parameters without gradient: {no_grad}"
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


@pytest.mark.parametrize("name", HYBRID_CASES)
def test_forward_masked_contract(built, images, name):
    model = built[name]
    mask = _mask(0.75)
    num_visible = GRID * GRID - 12
    with torch.no_grad():
        out = model.forward_masked(images, mask)
        assert out["tokens"].shape == (2, 1 + num_visible, model.embed_dim)
        assert out["fused"].shape == out["tokens"].shape
        assert out["mask"].shape == (2, GRID * GRID) and out["ids_restore"].shape == (2, GRID * GRID)
        assert torch.equal(out["mask"], mask.flatten(1))
        s4, s8 = out["pyramid"]
        assert s4.shape[-2:] == (IMG // 4, IMG // 4) and s8.shape[-2:] == (IMG // 8, IMG // 8)
        # ids_restore un-shuffles [visible, hidden] back to raster order (MAE convention)
        order = torch.cat([out["ids_keep"], torch.nonzero(mask.flatten(1))[:, 1].view(2, -1)], dim=1)
        assert torch.equal(order.gather(1, out["ids_restore"]), torch.arange(GRID * GRID).expand(2, -1))
        # the fusion really adds the conv maps; with nothing hidden, fused == forward_features
        assert not torch.allclose(out["fused"][:, 1:], out["tokens"][:, 1:])
        full = model.forward_masked(images, torch.zeros(2, GRID, GRID, dtype=torch.bool))
        torch.testing.assert_close(full["fused"], model.forward_features(images), atol=1e-5, rtol=1e-5)


def _leak_sensitive_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Copy with conv layer scales at 1 (they start at 1e-6, which would hide a leak in rounding)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("stage1", "stage2")) and name.endswith("ls.gamma"):
                param.fill_(1.0)
    return model


@pytest.mark.parametrize("name", HYBRID_CASES)
def test_changing_hidden_pixels_changes_no_masked_output(built, images, name):
    model = _leak_sensitive_copy(built[name])
    mask = _mask(0.5, seed=3)
    hidden_pixels = mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None].expand_as(images)
    changed_hidden = images.clone()
    changed_hidden[hidden_pixels] = torch.randn(int(hidden_pixels.sum())) * 5
    changed_visible = images.clone()
    changed_visible[~hidden_pixels] += 1.0
    with torch.no_grad():
        base = model.forward_masked(images, mask)
        hidden = model.forward_masked(changed_hidden, mask)
        visible = model.forward_masked(changed_visible, mask)
    for key in ("tokens", "fused"):
        assert torch.equal(base[key], hidden[key]), f"{key} depends on hidden pixels"
        assert not torch.allclose(base[key], visible[key])  # the test can fail: visible pixels do matter
    for level, (a, b) in enumerate(zip(base["pyramid"], hidden["pyramid"])):
        assert torch.equal(a, b), f"pyramid level {level} depends on hidden pixels"
    fine_hidden = mask.repeat_interleave(4, 1).repeat_interleave(4, 2)  # hidden cells at stride 4 are zero
    assert base["pyramid"][0].permute(0, 2, 3, 1)[fine_hidden].abs().max() == 0


def test_mask_validation_errors(built, images):
    model = built["hybrid_nano"]
    uneven = torch.zeros(2, GRID, GRID, dtype=torch.bool)
    uneven[0, 0, 0] = True
    with pytest.raises(ValueError, match="same number"):
        model.forward_masked(images, uneven)
    with pytest.raises(ValueError, match="does not match the patch grid"):
        model.forward_masked(images, torch.zeros(2, GRID + 1, GRID, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        model.forward_masked(images, torch.zeros(2, GRID, GRID))


def test_random_grid_mask_hides_exact_count_reproducibly():
    mask = random_grid_mask(8, 14, 14, 0.75, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (8, 14, 14)
    assert (mask.flatten(1).sum(1) == round(0.75 * 196)).all()
    assert torch.equal(mask, random_grid_mask(8, 14, 14, 0.75, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(mask[0], mask[1])
    with pytest.raises(ValueError):
        random_grid_mask(1, 4, 4, 1.0)


@pytest.mark.parametrize("name", HYBRID_CASES)
def test_features_only_matches_feature_info(images, name):
    model = timm.create_model(name, features_only=True, out_indices=(0, 1, -1)).eval()
    with torch.no_grad():
        maps = model(images)
    assert len(maps) == 3
    for feature, channels, reduction in zip(maps, model.feature_info.channels(), model.feature_info.reduction()):
        assert feature.shape == (2, channels, IMG // reduction, IMG // reduction)
    assert model.feature_info.reduction() == [4, 8, 16]


def test_forward_intermediates_final_matches_forward_features(built, images):
    model = built["hybrid_tiny"]
    with torch.no_grad():
        final, maps = model.forward_intermediates(images, indices=[0, 1, 5, -1])
        tokens_nlc = model.forward_intermediates(images, indices=[-1], output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(images))
    assert [m.shape[1] for m in maps] == [32, 64, 192, 192]
    assert tokens_nlc[0].shape == (2, GRID * GRID, 192)
    torch.testing.assert_close(tokens_nlc[0], maps[-1].flatten(2).transpose(1, 2))


def _loss_and_grads(model, images):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # same drop-path draws in both runs
    out = model(images)
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", HYBRID_CASES)
def test_grad_checkpointing_gives_same_outputs_and_grads(built, images, name):
    model = built[name]
    model.train()
    try:
        plain_out, plain_grads = _loss_and_grads(model, images)
        model.set_grad_checkpointing(True)
        ckpt_out, ckpt_grads = _loss_and_grads(model, images)
    finally:
        model.set_grad_checkpointing(False)
        model.zero_grad(set_to_none=True)
        model.eval()
    torch.testing.assert_close(ckpt_out, plain_out)
    for key, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[key], grad, msg=key)


def test_grad_checkpointing_with_drop_path_and_masking(images):
    torch.manual_seed(0)
    model = timm.create_model("hybrid_nano", drop_path_rate=0.3).train()
    mask = _mask(0.75)

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        out = model.forward_masked(images, mask)["fused"]
        out.pow(2).mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain_out, plain_grads = run()
    model.set_grad_checkpointing(True)
    ckpt_out, ckpt_grads = run()
    torch.testing.assert_close(ckpt_out, plain_out)
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b)


def test_drop_path_rate_is_used():
    model = timm.create_model("hybrid_nano", drop_path_rate=0.2)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)


def test_img_size_kwarg_and_other_input_sizes():
    model = timm.create_model("hybrid_nano", img_size=96, num_classes=0).eval()
    assert model.pos_embed.shape[1] == 36
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 96, 96)).shape == (1, 37, 96)
        assert model.forward_features(torch.randn(1, 3, 128, 64)).shape == (1, 33, 96)
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 96)  # num_classes=0 -> pooled features
        with pytest.raises(ValueError, match="multiple of 16"):
            model(torch.randn(1, 3, 72, 64))


def test_reset_classifier_no_weight_decay_and_layer_decay_groups(built):
    model = copy.deepcopy(built["hybrid_nano"])
    model.reset_classifier(3, global_pool="token")
    assert model(torch.randn(1, 3, IMG, IMG)).shape == (1, 3) and model.global_pool == "token"
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scale_of = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    assert len(set(scale_of.values())) == len(model.blocks) + 2  # conv stages+embeddings, each block, head
    assert scale_of[id(names["stage1.0.mlp.fc1.weight"])] == min(scale_of.values())
    assert scale_of[id(names["head.weight"])] == max(scale_of.values()) == 1.0
    assert len(scale_of) == len(names)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, IMG, IMG)).shape == (1, model.num_features)


def test_nano_is_fast_enough_for_tests():
    model = timm.create_model("hybrid_nano").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
        best = min(_timed(lambda: model(x)) for _ in range(3))
    assert best < 0.1


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@pytest.mark.slow  # a fresh interpreter importing torch and timm: seconds
def test_models_package_imports_no_other_stage():
    code = (
        "import sys, ssl_hybrid.models, ssl_hybrid.models.export, ssl_hybrid.models.flops;"
        "bad = [m for m in sys.modules if m.split('.')[:2] in (['ssl_hybrid', s] for s in "
        "('data', 'train', 'eval', 'objectives'))]; print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
