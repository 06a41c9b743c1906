"""The real hybrid backbone with each objective: every trainable parameter gets a gradient in one
step (so DDP needs no unused-parameter search), and weight 0 means the objective is not built."""

from __future__ import annotations

import pytest
import timm
import torch

import ssl_hybrid.models  # noqa: F401  (registers hybrid_*)
from ssl_hybrid.config import load_config
from ssl_hybrid.models.masking import random_grid_mask
from ssl_hybrid.objectives.combine import ObjectiveSettings, PretrainModel

CASES = {
    "joint": (1.0, 1.0, 0.0),
    "mim": (1.0, 0.0, 0.0),
    "dino": (0.0, 1.0, 0.0),
    "simclr": (0.0, 0.0, 1.0),
    "mim+simclr": (1.0, 0.0, 1.0),
}


def small_settings(weights, image_size: int) -> ObjectiveSettings:
    mim, dino, simclr = weights
    config = load_config(None, [f"objective.mim_weight={mim}", f"objective.dino_weight={dino}",
                                f"objective.simclr_weight={simclr}", f"data.image_size={image_size}",
                                "objective.dino_out_dim=32", "objective.decoder_dim=32", "objective.decoder_depth=1"])
    return ObjectiveSettings.from_config(config)


def build(weights):
    torch.manual_seed(0)
    backbone = timm.create_model("hybrid_nano", num_classes=0, img_size=32, drop_path_rate=0.1)
    return PretrainModel(backbone, small_settings(weights, 32))


@pytest.mark.parametrize("name", list(CASES))
def test_every_trainable_parameter_gets_a_gradient(name):
    model = build(CASES[name])
    global_views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    local_views = [torch.randn(4, 3, 16, 16)]  # multi-crop goes through the student unmasked
    masks = [random_grid_mask(4, 2, 2, 0.75, torch.Generator().manual_seed(i)) for i in range(2)]
    losses, stats = model(global_views, local_views, masks, teacher_temp=0.04)
    expected = {k for k, w in zip(("mim", "dino", "simclr"), CASES[name]) if w > 0} | {"loss"}
    assert set(losses) == expected
    weighted = sum(w * losses[k] for k, w in zip(("mim", "dino", "simclr"), CASES[name]) if w > 0)
    torch.testing.assert_close(losses["loss"], weighted)
    losses["loss"].backward()
    without = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not without, f"{name}: no gradient for {without}"
    if model.teacher is not None:  # the teacher is trained by EMA only
        assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    assert 0.0 < float(stats["embedding_std"])


def test_weight_zero_objective_is_not_built():
    model = build((1.0, 0.0, 0.0))
    assert model.dino is None and model.teacher is None and model.simclr is None and model.mim is not None
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"backbone", "mim"}


def test_joint_student_sees_only_visible_tokens_and_teacher_full_views():
    torch.manual_seed(0)
    backbone = timm.create_model("hybrid_nano", num_classes=0, img_size=64)
    model = PretrainModel(backbone, small_settings((1.0, 1.0, 0.0), 64))
    seen = {}
    masked, full = model.backbone.forward_masked, model.teacher.backbone.forward_features
    model.backbone.forward_masked = lambda x, m: seen.setdefault("student", masked(x, m))
    model.teacher.backbone.forward_features = lambda x: seen.setdefault("teacher", full(x))
    views = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    masks = [random_grid_mask(2, 4, 4, 0.75, torch.Generator().manual_seed(i)) for i in range(2)]
    model(views, [], masks, 0.04)
    assert seen["student"]["fused"].shape[1] == 1 + 4  # class token + the 25% visible of 16 patches
    assert seen["teacher"].shape[1] == 1 + 16


@pytest.mark.parametrize("embedding", ["default", "multiscale"])
def test_simclr_pairs_the_local_crops_with_both_global_views(embedding):
    """Multi-crop SimCLR: the model's loss is the contrastive objective on the global and the local embeddings
    (made by the training embedding), not on the global pair alone."""
    config = load_config(None, ["objective.mim_weight=0", "objective.dino_weight=0", "objective.simclr_weight=1",
                                "data.image_size=32", f"objective.embedding={embedding}"])
    torch.manual_seed(0)
    model = PretrainModel(timm.create_model("resvit_nano", num_classes=0, img_size=32),
                          ObjectiveSettings.from_config(config))
    model.eval()  # batch norm from running statistics: the same embedding on every call
    global_views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    local_views = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    with torch.no_grad():
        losses, _ = model(global_views, local_views)
        embed = model.view_embedding
        expected = model.simclr([embed(v) for v in global_views], [embed(v) for v in local_views])["simclr"]
        two_view = model.simclr([embed(v) for v in global_views])["simclr"]
    width = model.backbone.num_multiscale_features if embedding == "multiscale" else model.backbone.num_features
    assert embed(local_views[0]).shape == (4, width)
    torch.testing.assert_close(losses["simclr"], expected)
    assert not torch.allclose(losses["simclr"], two_view)
