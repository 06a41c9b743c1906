"""Each loss against a reference computed independently on fixed tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_hybrid.objectives.contrastive import ContrastiveObjective
from ssl_hybrid.objectives.distill import DINOObjective, DistributedDINOLoss, EMATeacher
from ssl_hybrid.objectives.mim import MIMDecoder, masked_patch_loss, pixel_targets

# ------------------------------------------------------------------------------------- MIM

def test_pixel_targets_match_per_patch_numpy_reference():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = pixel_targets(images, 16, norm_pix=True)
    assert target.shape == (2, 4, 16 * 16 * 3)
    array = images.numpy()
    for b in range(2):
        for row in range(2):
            for col in range(2):
                patch = array[b, :, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16]
                flat = patch.transpose(1, 2, 0).reshape(-1)  # MAE's (p, q, c) order
                expected = (flat - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-6)
                np.testing.assert_allclose(target[b, row * 2 + col].numpy(), expected, rtol=1e-4, atol=1e-5)
    raw = pixel_targets(images, 16, norm_pix=False)
    np.testing.assert_allclose(raw[1, 3].numpy(), array[1, :, 16:, 16:].transpose(1, 2, 0).reshape(-1))


def test_masked_patch_loss_counts_hidden_patches_only():
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 6, generator=gen), torch.randn(2, 4, 6, generator=gen)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    expected = np.mean([((pred[b, n] - target[b, n]) ** 2).mean().item()
                        for b in range(2) for n in range(4) if mask[b, n]])
    assert masked_patch_loss(pred, target, mask).item() == pytest.approx(expected, rel=1e-6)
    changed = pred.clone()
    changed[~mask] += 100.0  # visible patches carry no loss
    assert masked_patch_loss(changed, target, mask).item() == pytest.approx(expected, rel=1e-6)


def test_decoder_puts_visible_tokens_back_in_grid_order(make_masks):
    decoder = MIMDecoder(embed_dim=8, grid=(2, 2), decoder_dim=8, depth=1)
    mask = make_masks(3, 2, 0.5, seed=0).flatten(1)  # [B, 4]
    ids_shuffle = torch.argsort(mask.int(), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    grid_tokens = torch.arange(3 * 4 * 8, dtype=torch.float32).view(3, 4, 8)
    visible = torch.gather(grid_tokens, 1, ids_shuffle[:, :2, None].expand(-1, -1, 8))
    tokens = torch.cat([torch.full((3, 1, 8), -1.0), visible], dim=1)
    restored = decoder.restore_order(tokens, ids_restore)  # [B, 1+N, D]
    assert torch.equal(restored[:, 0], tokens[:, 0])
    for b in range(3):
        for n in range(4):
            expected = decoder.mask_token[0, 0] if mask[b, n] else grid_tokens[b, n]
            assert torch.equal(restored[b, 1 + n], expected)


# ------------------------------------------------------------------------------------- SimCLR

def reference_ntxent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> float:
    """SimCLR's NT-Xent written out: 2N anchors, positive = the other view, all 2N-1 others in the denominator."""
    z = F.normalize(torch.cat([z0, z1]), dim=1).double()
    n = z0.shape[0]
    sim = z @ z.T / temperature
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        total += -(sim[i, positive] - torch.logsumexp(sim[i, others], dim=0)).item()
    return total / (2 * n)


def test_ntxent_matches_reference():
    objective = ContrastiveObjective(embed_dim=8, out_dim=4, temperature=0.2, hidden_dim=16)
    gen = torch.Generator().manual_seed(2)
    z0, z1 = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    assert objective.loss(z0, z1).item() == pytest.approx(reference_ntxent(z0, z1, 0.2), rel=1e-5)
    out = objective([torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)])
    assert set(out) == {"simclr"} and out["simclr"].dtype == torch.float32


def test_multicrop_ntxent_is_the_mean_over_the_global_pair_and_every_global_local_pair():
    objective = ContrastiveObjective(embed_dim=8, out_dim=4, temperature=0.2, hidden_dim=16)
    gen = torch.Generator().manual_seed(3)
    g0, g1, l0, l1 = (torch.randn(6, 8, generator=gen) for _ in range(4))
    z = {name: objective.project(e) for name, e in (("g0", g0), ("g1", g1), ("l0", l0), ("l1", l1))}
    pairs = [("g0", "g1"), ("g0", "l0"), ("g1", "l0"), ("g0", "l1"), ("g1", "l1")]
    expected = sum(reference_ntxent(z[a], z[b], 0.2) for a, b in pairs) / len(pairs)
    assert objective([g0, g1], [l0, l1])["simclr"].item() == pytest.approx(expected, rel=1e-5)
    assert objective([g0, g1], [])["simclr"].item() == pytest.approx(reference_ntxent(z["g0"], z["g1"], 0.2),
                                                                       rel=1e-5)
    with pytest.raises(ValueError, match="exactly 2 global views"):
        objective([g0, g1, l0])


# ------------------------------------------------------------------------------------- DINO

def reference_dino(teacher, student, center, teacher_temp, student_temp):
    """DINO's reference loss (facebookresearch/dino DINOLoss.forward), views as lists of [B, K]."""
    total, terms = 0.0, 0
    for iq, t in enumerate(teacher):
        q = F.softmax((t - center) / teacher_temp, dim=-1)
        for v, s in enumerate(student):
            if v == iq:
                continue
            total += torch.sum(-q * F.log_softmax(s / student_temp, dim=-1), dim=-1).mean()
            terms += 1
    return (total / terms).item()


def test_dino_loss_matches_reference_and_center_commits_only_after_good_steps():
    gen = torch.Generator().manual_seed(3)
    teacher = [torch.randn(4, 10, generator=gen) for _ in range(2)]
    student = [torch.randn(4, 10, generator=gen) for _ in range(4)]  # 2 global + 2 local crops
    loss_fn = DistributedDINOLoss(output_dim=10, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, 1, 10, generator=gen))
    center = loss_fn.center.clone()
    value = loss_fn(teacher, student, teacher_temp=0.05).item()
    assert value == pytest.approx(reference_dino(teacher, student, center, 0.05, 0.1), rel=1e-5)
    assert torch.equal(loss_fn.center, center), "the center must not move before the step is known good"
    loss_fn.commit_center()
    expected_center = 0.9 * center + 0.1 * torch.stack(teacher).mean(dim=(0, 1))
    torch.testing.assert_close(loss_fn.center, expected_center)
    loss_fn(teacher, student, teacher_temp=0.05)
    loss_fn.discard_center()
    loss_fn.commit_center()
    torch.testing.assert_close(loss_fn.center, expected_center)


def test_dino_teacher_temperature_changes_the_loss():
    objective = DINOObjective(embed_dim=8, out_dim=16, student_temp=0.1)
    gen = torch.Generator().manual_seed(4)
    student = [torch.randn(3, 8, generator=gen) for _ in range(2)]
    teacher = [torch.randn(3, 16, generator=gen) for _ in range(2)]
    cold = objective(student, teacher, teacher_temp=0.04)["dino"].item()
    warm = objective(student, teacher, teacher_temp=0.07)["dino"].item()
    assert math.isfinite(cold) and math.isfinite(warm) and cold != warm


def test_ema_teacher_update_is_the_momentum_average(tiny_backbone):
    head = DINOObjective(embed_dim=32, out_dim=16, student_temp=0.1).head
    teacher = EMATeacher(tiny_backbone, head)
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in tiny_backbone.parameters():
            p.add_(1.0)
    before = {n: p.clone() for n, p in teacher.backbone.named_parameters()}
    teacher.update(tiny_backbone, head, momentum=0.9)
    for name, p in tiny_backbone.named_parameters():
        torch.testing.assert_close(dict(teacher.backbone.named_parameters())[name], 0.9 * before[name] + 0.1 * p)


# ------------------------------------------------------------------------------------- training embedding

def test_multiscale_training_embedding_feeds_every_conv_stage_to_simclr():
    import timm

    import ssl_hybrid.models  # noqa: F401  (registers resvit_*)
    from ssl_hybrid.config import ConfigError, load_config
    from ssl_hybrid.objectives.combine import ObjectiveSettings, PretrainModel

    simclr = ["data.image_size=32", "objective.mim_weight=0", "objective.dino_weight=0", "objective.simclr_weight=1",
              "objective.embedding=multiscale"]
    settings = ObjectiveSettings.from_config(load_config(None, simclr))
    backbone = timm.create_model("resvit_nano", num_classes=0, img_size=32)
    model = PretrainModel(backbone, settings)
    assert model.simclr.head.layers[0].in_features == backbone.num_multiscale_features == 16 + 32 + 64 + 2 * 64
    views = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    losses, _ = model(views, [])
    losses["loss"].backward()
    stem_grad = backbone.stem_conv.weight.grad  # (block convs start behind a zero-init BN gamma)
    assert torch.isfinite(losses["loss"]) and stem_grad is not None and stem_grad.abs().sum() > 0
    resnet = PretrainModel(timm.create_model("resnet10t", num_classes=0), settings)  # its stage maps, the same way
    assert resnet.simclr.head.layers[0].in_features == 64 + 128 + 256 + 512
    assert torch.isfinite(resnet(views, [])[0]["loss"])
    with pytest.raises(ValueError, match="stage maps at several strides"):
        PretrainModel(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32), settings)
    with pytest.raises(ConfigError, match="objective.embedding"):
        load_config(None, ["objective.embedding=multiscale"])  # the default objective is MIM + DINO
