"""One hybrid family (issue 30): ``resvit_*`` and ``hybrid_*`` are presets of one class with a conv-stage choice.

* the layout every preset had before the merge (state dicts saved then load with strict=True and compute the same);
* the conv-stage choice swapped on a preset (ConvNeXt stages to stride 16, ResNet stages to stride 8) keeps the
  contract and the masked-leak guarantee;
* sparse attention and token selection on the default model's preset, masked forward leak-free with each
  attention mode, multi-scale pooling honouring selection;
* the trainer passes the family's options to every preset (``resvit_*`` were silently dropped);
* unsupported combinations are one-line ``UserError``\\ s.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

import ssl_hybrid.models  # noqa: F401  (registers the presets)
from ssl_hybrid.config import load_config
from ssl_hybrid.errors import UserError
from ssl_hybrid.models import HYBRID_VARIANTS, RESVIT_VARIANTS
from ssl_hybrid.models.hybrid import PRESETS, HybridViT
from ssl_hybrid.models.masking import random_grid_mask

IMG = 64
GRID = IMG // 16
LEGACY = Path(__file__).parent / "data"  # written by data/make_legacy_fixture.py on the commit before the merge

# A preset with its conv stages swapped, or cut to two stages: the other half of the conv/transformer split.
SWAPPED = [
    pytest.param("resvit_nano", dict(conv_stages="convnext"), id="convnext-3-stages"),  # tokens: 1x1 of stride 16
    pytest.param("hybrid_nano", dict(conv_stages="resnet", stem_dim=16), id="resnet-2-stages"),  # tokens: 2x2 cells
]


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Non-zero residual gammas (BN's last weight, ConvNeXt layer scale): at init they hide a leak."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("bn2.weight", "ls.gamma")):
                param.fill_(0.5)
    return model


# ------------------------------------------------------------------------------- the layout before the merge


def test_every_preset_keeps_the_state_dict_layout_it_had():
    layout = json.loads((LEGACY / "legacy_layout.json").read_text())
    assert set(layout) == set(HYBRID_VARIANTS + RESVIT_VARIANTS) == set(PRESETS)
    for name, expected in layout.items():
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=0)
        assert isinstance(model, HybridViT)
        assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected, name


@pytest.mark.parametrize("name", ["resvit_nano", "hybrid_nano"])
def test_a_state_dict_saved_before_the_merge_loads_strictly_and_computes_the_same(name):
    with safe_open(str(LEGACY / f"legacy_{name}.safetensors"), "pt") as saved:
        kwargs = json.loads(saved.metadata()["kwargs"])
        tensors = {key: saved.get_tensor(key) for key in saved.keys()}  # noqa: SIM118 (safe_open has no iterator)
    model = timm.create_model(name, num_classes=3, **kwargs)
    model.load_state_dict({k[len("state.") :]: v for k, v in tensors.items() if k.startswith("state.")}, strict=True)
    x, mask = tensors["out.input"], tensors["out.mask"].bool()
    with torch.no_grad():
        model.eval()
        now = dict(
            features=model.forward_features(x),
            multiscale=model.forward_multiscale(x),
            masked_fused=model.forward_masked(x, mask)["fused"],
        )
        model.train()
        now["train_features"] = model.forward_features(x)  # batch statistics
    for key, value in now.items():
        torch.testing.assert_close(value, tensors[f"out.{key}"], msg=f"{name} {key}")


# ------------------------------------------------------------------------------- the conv-stage choice


@pytest.mark.parametrize("name, kwargs", SWAPPED)
def test_swapped_conv_stages_keep_the_contract(images, name, kwargs):
    model = _trained_like(timm.create_model(name, num_classes=5, **kwargs)).train()
    feats = model.forward_features(images)
    assert feats.shape == (3, 1 + GRID * GRID, model.embed_dim)
    assert [m.shape[1] for m in model.forward_intermediates(images, intermediates_only=True)] == [
        info["num_chs"] for info in model.feature_info
    ]
    assert model.forward_multiscale(images).shape == (3, model.num_multiscale_features)
    model.forward_head(feats).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


MASKED_CASES = [
    pytest.param(name, dict(attn_mode=mode, window_size=2, attn_topk=3), id=f"{name}-{mode}")
    for name in ("resvit_nano", "hybrid_nano")
    for mode in ("global", "window", "topk")
] + SWAPPED


@pytest.mark.parametrize("name, kwargs", MASKED_CASES)
def test_masked_forward_never_depends_on_hidden_pixels(images, name, kwargs):
    """SparK-style masked conv + visible tokens only, in train mode (batch statistics) with each attention mode."""
    torch.manual_seed(0)
    model = _trained_like(timm.create_model(name, num_classes=0, **kwargs)).train()
    mask = random_grid_mask(3, GRID, GRID, 0.5, generator=torch.Generator().manual_seed(3))
    hidden = mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None].expand_as(images)
    noisy = images.clone()
    noisy[hidden] = torch.randn(int(hidden.sum())) * 5
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        base = model.forward_masked(images, mask)
        model.load_state_dict(state)  # the same running statistics for both passes
        other = model.forward_masked(noisy, mask)
    assert base["tokens"].shape[1] == 1 + int((~mask[0]).sum())  # the transformer saw the visible tokens only
    for key in ("tokens", "fused"):
        assert torch.equal(base[key], other[key]), f"{key} depends on hidden pixels"
    assert all(torch.equal(a, b) for a, b in zip(base["pyramid"], other["pyramid"]))


# ------------------------------------------------------------------------------- features on the default preset


def test_multiscale_embedding_honours_token_selection_and_ignores_padding(images):
    """Adaptive selection pads the batch to its largest count: the pooled embedding of an image must not depend
    on the padding its batch-mates caused, and selection must change it (it is not silently skipped)."""
    torch.manual_seed(0)
    model = timm.create_model("resvit_nano", num_classes=0, depth=2).eval()
    images = images.clone()
    images[1] = 0.0
    images[1, :, :16, :16] = 3.0  # one bright patch: attention concentrates, this image keeps fewer tokens
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8)  # sharper attention than at init, as after training
        dense = model.forward_multiscale(images)
        model.set_token_selection(keep_share=0.5, blocks=(1,))
        batch = model.forward_multiscale(images)
        one_by_one = torch.cat([model.forward_multiscale(images[i : i + 1]) for i in range(3)])
        model.global_pool = "multiscale"
        via_head = model.forward_head(model.forward_features(images), pre_logits=True)
    assert model.last_token_mask is not None, "the batch should be padded (counts differ per image)"
    torch.testing.assert_close(batch, one_by_one)
    torch.testing.assert_close(via_head, batch)
    assert not torch.allclose(batch, dense, atol=1e-4)


def test_token_selection_on_a_one_block_preset_selects_inside_that_block(images):
    model = timm.create_model("resvit_nano", num_classes=0, token_keep_rate=0.5).eval()
    assert model.token_select_blocks == (0,)
    with torch.no_grad():
        assert model.forward_features(images).shape[1] == 1 + GRID * GRID // 2 + 1  # class + kept + fused
    assert model.last_tokens_kept.tolist() == [GRID * GRID // 2] * 3


def test_trainer_passes_family_options_to_every_preset(tmp_path):
    from ssl_hybrid.train.wiring import build_backbone

    for name in ("resvit_nano", "hybrid_nano"):
        config = load_config(
            None,
            [
                f"model.name={name}",
                "data.image_size=32",
                "model.attn_mode=window",
                "model.token_keep_rate=0.5",
                "model.arch.window_size=1",
            ],
        )
        model = build_backbone(config)
        assert {b.attn.attn_mode for b in model.blocks} == {"window"} and model.window_size == 1, name
        assert model.token_select.keep_rate == 0.5, name


# ------------------------------------------------------------------------------- unsupported combinations


def _trainer_backbone(name: str, *overrides: str):
    from ssl_hybrid.train.wiring import build_backbone

    return build_backbone(load_config(None, [f"model.name={name}", "data.image_size=32", *overrides]))


UNSUPPORTED = [
    pytest.param(lambda: timm.create_model("resvit_nano", conv_stages="vgg"), "conv_stages", id="conv-kind"),
    pytest.param(
        lambda: timm.create_model("hybrid_nano", conv_dims=(8,), conv_depths=(1,)), "2 or 3 stages", id="one-stage"
    ),
    pytest.param(lambda: timm.create_model("resvit_nano", attn_mode="sparse"), "attn_mode", id="attn-mode"),
    pytest.param(
        lambda: timm.create_model("resvit_nano", attn_mode="window", window_size=0), "window_size", id="window-0"
    ),
    pytest.param(lambda: timm.create_model("resvit_nano", token_keep_rate=0.0), "token_keep_rate", id="keep-0"),
    pytest.param(lambda: timm.create_model("resvit_tiny", token_keep_share=1.5), "token_keep_share", id="share"),
    pytest.param(
        lambda: timm.create_model("resvit_tiny", token_keep_rate=0.5, token_select_blocks=(4,)),
        "out of range",
        id="select-block",
    ),
    pytest.param(
        lambda: timm.create_model("resvit_nano", token_keep_rate=0.5).forward_intermediates(torch.zeros(1, 3, 32, 32)),
        "set_token_selection",
        id="intermediates-with-selection",
    ),
]


@pytest.mark.parametrize("make, names", UNSUPPORTED)
def test_unsupported_combinations_are_one_line_user_errors(make, names):
    with pytest.raises(UserError, match=names) as raised:
        make()
    assert "\n" not in str(raised.value)


@pytest.mark.fault(
    injected="model.token_keep_rate=0.5 / model.attn_mode=topk for a model without them (resnet18)",
    did="one-line ConfigError naming the key, before any run starts",
    lost="nothing (they used to be dropped without a word, for resvit_* too)",
)
@pytest.mark.parametrize("override", ["model.token_keep_rate=0.5", "model.attn_mode=topk"])
def test_family_options_for_a_model_without_them_are_refused(override):
    with pytest.raises(UserError, match=override.split("=")[0]) as raised:
        _trainer_backbone("resnet18", override)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "name, kwargs",
    [pytest.param("hybrid_nano", {}, id="hybrid_nano"), pytest.param("resvit_nano", {}, id="resvit_nano"), *SWAPPED],
)
def test_masked_forward_runs_under_bf16_autocast(images, name, kwargs):
    """The trainer's bf16 autocast: masked maps keep the image's dtype through every stage (a bf16 map met a
    float32 residual branch in the visible-rows scatter once the conv stages were shared)."""
    model = _trained_like(timm.create_model(name, num_classes=0, **kwargs)).train()
    mask = random_grid_mask(3, GRID, GRID, 0.5, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_masked(images, mask)
    assert torch.isfinite(out["fused"].float()).all()
