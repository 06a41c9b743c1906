"""Batched augmentations (ssl_hybrid.data.augment): lightly's RGB recipe in distribution, any channel count,
determinism from the generator, device placement.

The in-distribution tests apply lightly's / torchvision's op (on PIL images, as the workers do today) and ours
(batched tensors) to the same photos many times and compare per-image summary statistics. For N draws per side,
the means of a statistic must agree within 4 standard errors of their difference, sqrt(var_a/N + var_b/N), and
the stds within 4 standard errors sqrt(std_a^2/2N + std_b^2/2N) (normal approximation), each plus half a uint8
level per op for the PIL side's rounding to 1/255 (QUANT). The share of images an op changes must be within
4 binomial standard errors of lightly's probability. Each comparison is also run against a deliberately wrong
parameter to show it can fail (``test_the_comparison_rejects_a_wrong_strength``).
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from types import SimpleNamespace

import lightly.transforms as LT
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from ssl_hybrid.data import augment as aug
from ssl_hybrid.data.augment import ViewRecipe, augment_generator, build_batch_augment, photometric

N_PHOTOS, REPEATS, SIZE = 8, 100, 16  # 800 draws per side and op
QUANT = 0.5 / 255
NO_OPS = ViewRecipe(size=SIZE)  # every photometric op off


def photos() -> list[Image.Image]:
    """Small real-looking photos: smooth colour gradients with texture (reproducible, no files needed)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(N_PHOTOS):
        yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
        base = rng.uniform(0.1, 0.9, 3)[:, None, None] + rng.uniform(-0.4, 0.4, (3, 1, 1)) * (xx + yy) / 2
        image = np.clip(base + rng.normal(0, 0.08, (3, SIZE, SIZE)), 0, 1)
        out.append(Image.fromarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8)))
    return out


PHOTOS = photos()
BATCH = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in PHOTOS]).repeat(REPEATS, 1, 1, 1)


def summaries(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image statistics ([N] each) of float images [N, 3, H, W] in [0, 1], the i-th made from BATCH[i]."""
    x = x.double()
    return {
        "change": (x - BATCH.double() / 255).abs().mean((1, 2, 3)),
        "mean": x.mean((1, 2, 3)),
        "std": x.std((1, 2, 3)),
        "saturation": (x.amax(1) - x.amin(1)).mean((1, 2)),
        "red_minus_blue": (x[:, 0] - x[:, 2]).mean((1, 2)),
        "green_minus_mean": (x[:, 1] - x.mean(1)).mean((1, 2)),
        "sharpness": (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)),
    }


def changed_share(before: torch.Tensor, after: torch.Tensor) -> float:
    return float(((after.double() - before.double()).abs().amax((1, 2, 3)) > 1.5 / 255).double().mean())


def lightly_side(transform, seed: int = 0) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    out = [transform(PHOTOS[i % N_PHOTOS]) for i in range(len(BATCH))]
    if isinstance(out[0], torch.Tensor):  # lightly's whole view transform ends with ToTensor: [0, 1] floats
        return torch.stack([o.as_subclass(torch.Tensor) for o in out]).double()
    return torch.stack([TF.pil_to_tensor(o) for o in out]).double() / 255


def our_side(recipe: ViewRecipe, seed: int = 0) -> torch.Tensor:
    return photometric(aug.to_unit(BATCH), recipe, torch.Generator().manual_seed(seed))


def compare(theirs: torch.Tensor, ours: torch.Tensor, ops: int, keys=None) -> list[str]:
    """The statistics whose means or stds differ beyond the tolerance (empty = same distribution)."""
    failures = []
    a, b = summaries(theirs), summaries(ours)
    n = len(theirs)
    for key in keys or a:
        ma, mb, sa, sb = a[key].mean(), b[key].mean(), a[key].std(), b[key].std()
        mean_tol = 4 * math.sqrt((sa**2 + sb**2) / n) + ops * QUANT
        std_tol = 4 * math.sqrt((sa**2 + sb**2) / (2 * n)) + ops * QUANT
        if abs(ma - mb) > mean_tol:
            failures.append(f"{key} mean {ma:.4f} vs {mb:.4f} (tol {mean_tol:.4f})")
        if abs(sa - sb) > std_tol:
            failures.append(f"{key} std {sa:.4f} vs {sb:.4f} (tol {std_tol:.4f})")
    return failures


def assert_probability(share: float, p: float, n: int, what: str) -> None:
    tol = 4 * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-9
    assert abs(share - p) <= tol, f"{what}: changed {share:.3f} of the images, lightly's probability {p} (tol {tol:.3f})"


def jitter(**amounts: float):
    return T.RandomApply([T.ColorJitter(**amounts)], p=0.8)


# (name, lightly/torchvision op on PIL, our recipe, lightly's probability of changing an image)
SINGLE_OPS = [
    ("brightness", lambda: jitter(brightness=0.8), dict(jitter=0.8, brightness=0.8), 0.8),
    ("contrast", lambda: jitter(contrast=0.8), dict(jitter=0.8, contrast=0.8), 0.8),
    ("saturation", lambda: jitter(saturation=0.8), dict(jitter=0.8, saturation=0.8), 0.8),
    ("hue", lambda: jitter(hue=0.2), dict(jitter=0.8, hue=0.2), None),
    ("grayscale", lambda: T.RandomGrayscale(0.2), dict(grayscale=0.2), 0.2),
    ("blur", lambda: LT.GaussianBlur(prob=0.5, sigmas=(0.1, 2)), dict(blur=0.5), None),
    ("solarize", lambda: LT.RandomSolarization(prob=0.2), dict(solarize=0.2), 0.2),
]


@pytest.mark.parametrize("name,theirs,ours,probability", SINGLE_OPS, ids=[op[0] for op in SINGLE_OPS])
def test_each_rgb_op_matches_lightly_in_distribution(name, theirs, ours, probability):
    lightly_out, our_out = lightly_side(theirs()), our_side(replace(NO_OPS, **ours))
    failures = compare(lightly_out, our_out, ops=1)
    assert not failures, failures
    if probability is not None:  # (a small hue shift or sigma can leave an image unchanged: no share to read)
        base = BATCH.double() / 255
        assert_probability(changed_share(base, lightly_out), probability, len(BATCH), f"lightly {name}")
        assert_probability(changed_share(base, our_out), probability, len(BATCH), f"our {name}")


@pytest.mark.parametrize("views", ["simclr", "dino"])
def test_whole_rgb_recipe_matches_lightly_in_distribution(views):
    """lightly's whole view transform (crop at full scale: the photos are as big as the view) against ours."""
    from lightly.transforms import DINOTransform, SimCLRTransform

    if views == "simclr":
        reference = SimCLRTransform(input_size=SIZE, min_scale=1.0, normalize=None).transforms[0]
        cfg = SimpleNamespace(views="simclr", image_size=SIZE, local_image_size=SIZE, num_local_views=0,
                              simclr_min_scale=1.0, simclr_local_min_scale=1.0, simclr_blur=0.5,
                              simclr_color_jitter=1.0, simclr_hue=0.2, simclr_grayscale=0.2, channels=3)
        view = 0
    else:  # the second global view: blur 0.1 and solarize 0.2
        reference = DINOTransform(global_crop_size=SIZE, global_crop_scale=(1.0, 1.0), normalize=None).transforms[1]
        cfg = SimpleNamespace(views="dino", image_size=SIZE, local_image_size=SIZE, num_local_views=0, channels=3)
        view = 1
    recipe = aug.view_recipes(cfg)[0][view]
    lightly_out, our_out = lightly_side(reference), our_side(recipe)
    failures = compare(lightly_out, our_out, ops=5)
    assert not failures, failures


def test_the_comparison_rejects_a_wrong_strength():
    """The tolerances are tight enough to see lightly's brightness 0.8 from 0.5 and hue 0.2 from 0.1."""
    assert compare(lightly_side(jitter(brightness=0.8)), our_side(replace(NO_OPS, jitter=0.8, brightness=0.5)), 1)
    assert compare(lightly_side(jitter(hue=0.2)), our_side(replace(NO_OPS, jitter=0.8, hue=0.1)), 1)


def simclr_cfg(**changes):
    values = dict(views="simclr", image_size=16, local_image_size=8, num_local_views=2, simclr_min_scale=0.25,
                  simclr_local_min_scale=0.05, simclr_blur=0.5, simclr_color_jitter=1.0, simclr_hue=0.2,
                  simclr_grayscale=0.2, channels=3)
    return SimpleNamespace(**{**values, **changes})


def five_channel_batch(crop_flip, n: int = 6) -> dict:
    from ssl_hybrid.data.views import collate_views

    g = torch.Generator().manual_seed(1)
    images = [torch.rand(5, 30, 26, generator=g) * torch.tensor([1, 1, 1, 1, 0.003]).view(5, 1, 1) for _ in range(n)]
    return collate_views([dict(crop_flip(im), key=str(i)) for i, im in enumerate(images)])


def test_five_channels_get_per_channel_intensity_ops_and_their_normalisation():
    mean, std = [0.5, 0.5, 0.5, 0.5, 0.0015], [0.25, 0.25, 0.25, 0.25, 0.001]
    crop_flip, batch_augment = build_batch_augment(simclr_cfg(), channels=5, mean=mean, std=std)
    batch = five_channel_batch(crop_flip)
    assert [tuple(v.shape) for v in batch["global_views"]] == [(6, 5, 16, 16)] * 2
    assert [tuple(v.shape) for v in batch["local_views"]] == [(6, 5, 8, 8)] * 2
    out = batch_augment(batch, augment_generator(0, 0, 0))
    view = out["global_views"][0]
    assert view.dtype == torch.float32 and view.shape == (6, 5, 16, 16) and torch.isfinite(view).all()
    # the dim 5th channel survives at its own scale (normalised with its own statistics, not swamped)
    assert 0.05 < float(view[:, 4].std()) < 20
    # brightness is drawn per channel: the channels of one image are scaled differently
    before = batch["global_views"][0]
    ratios = out["global_views"][0] * torch.tensor(std).view(1, 5, 1, 1) + torch.tensor(mean).view(1, 5, 1, 1)
    ratios = ratios.mean((2, 3)) / before.mean((2, 3))
    assert (ratios[:, :4].std(1) > 1e-3).any()
    with pytest.raises(ValueError, match="5 channels, the normalisation 3"):
        build_batch_augment(simclr_cfg())[1](batch, augment_generator(0, 0, 0))
    with pytest.raises(ValueError, match="mean and std"):
        build_batch_augment(simclr_cfg(), channels=5)


def test_no_colour_ops_for_other_channel_counts():
    globals_, locals_ = aug.view_recipes(SimpleNamespace(views="dino", image_size=16, local_image_size=8,
                                                         num_local_views=2), channels=5)
    for recipe in globals_ + locals_:
        assert recipe.hue == recipe.saturation == recipe.grayscale == recipe.solarize == 0
        assert recipe.gamma > 0 and recipe.noise > 0 and recipe.brightness > 0


def rgb_batch(n: int = 6) -> dict:
    crop_flip, _ = build_batch_augment(simclr_cfg())
    from ssl_hybrid.data.views import collate_views

    return collate_views([dict(crop_flip(PHOTOS[i % N_PHOTOS]), key=str(i)) for i in range(n)])


def test_draws_are_a_function_of_seed_step_rank_and_leave_the_global_rngs_alone():
    _, batch_augment = build_batch_augment(simclr_cfg())
    batch = rgb_batch()
    state = torch.get_rng_state()
    first = batch_augment(batch, augment_generator(7, 3, 0))
    again = batch_augment(batch, augment_generator(7, 3, 0))
    views = lambda b: b["global_views"] + b["local_views"]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(views(first), views(again)))
    for other in (augment_generator(7, 4, 0), augment_generator(7, 3, 1), augment_generator(8, 3, 0)):
        assert not torch.equal(batch_augment(batch, other)["global_views"][0], first["global_views"][0])
    assert torch.equal(torch.get_rng_state(), state)
    assert all(v.dtype == torch.uint8 for v in views(batch))  # the input batch is not written into


def test_integer_and_float_inputs_give_the_same_views():
    _, batch_augment = build_batch_augment(simclr_cfg())
    batch = rgb_batch()
    as_float = dict(batch, global_views=[v.float() / 255 for v in batch["global_views"]],
                    local_views=[v.float() / 255 for v in batch["local_views"]])
    a = batch_augment(batch, augment_generator(0, 0, 0))["global_views"][0]
    b = batch_augment(as_float, augment_generator(0, 0, 0))["global_views"][0]
    torch.testing.assert_close(a, b)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_views_stay_on_their_device_and_match_the_cpu(device):
    _, batch_augment = build_batch_augment(simclr_cfg())
    batch = rgb_batch()
    moved = dict(batch, global_views=[v.to(device) for v in batch["global_views"]],
                 local_views=[v.to(device) for v in batch["local_views"]])
    out = batch_augment(moved, augment_generator(0, 0, 0))
    assert all(v.device.type == device for v in out["global_views"] + out["local_views"])
    reference = batch_augment(batch, augment_generator(0, 0, 0))["global_views"][0]
    torch.testing.assert_close(out["global_views"][0].cpu(), reference, atol=1e-4, rtol=1e-4)


def test_batched_hue_is_torchvisions_adjust_hue_per_image():
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(12, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    x[0] = 0.5  # gray: no hue to shift
    x[1, 1] = x[1, 0]  # red and green tied for the maximum
    shift = torch.linspace(-0.5, 0.5, 12)
    expected = torch.stack([TF.adjust_hue(image, float(s)) for image, s in zip(x, shift)])
    torch.testing.assert_close(aug.hue(x, shift), expected, atol=1e-5, rtol=0)


def test_a_batch_that_is_all_grayscale_is_normalised_in_place_safely():
    """All images of a batch drawn for grayscale (a one-image batch at p=1), then normalised in place."""
    recipe = replace(NO_OPS, grayscale=1.0)
    batch_augment = aug.BatchAugment([recipe], [])
    out = batch_augment({"global_views": [BATCH[:1]], "local_views": []}, augment_generator(0, 0, 0))["global_views"][0]
    assert out.shape == (1, 3, SIZE, SIZE) and torch.isfinite(out).all()
    gray = out * torch.tensor(aug.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(aug.IMAGENET_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(gray[:, 0], gray[:, 2])  # still gray after the in-place ops


def test_views_the_workers_normalised_are_augmented_in_unit_range_and_renormalised():
    mean, std = [0.4, 0.5, 0.3, 0.6, 0.002], [0.2, 0.25, 0.1, 0.3, 0.001]
    recipes = aug.view_recipes(simclr_cfg(num_local_views=0), channels=5)
    g = torch.Generator().manual_seed(2)
    raw = torch.rand(4, 5, 16, 16, generator=g) * torch.tensor([1, 1, 1, 1, 0.004]).view(1, 5, 1, 1)
    normalised = (raw - torch.tensor(mean).view(1, 5, 1, 1)) / torch.tensor(std).view(1, 5, 1, 1)
    plain = aug.BatchAugment(*recipes, mean, std)({"global_views": [raw] * 2, "local_views": []}, augment_generator(0, 1, 0))
    again = aug.BatchAugment(*recipes, mean, std, normalised_inputs=True)(
        {"global_views": [normalised] * 2, "local_views": []}, augment_generator(0, 1, 0))
    torch.testing.assert_close(again["global_views"][0], plain["global_views"][0], atol=2e-3, rtol=1e-4)


def test_noise_is_sized_by_each_channels_own_spread():
    """A dim channel (values < 0.004 of the range) gets noise of its own size, not of the bright channels'."""
    raw = torch.rand(8, 2, 16, 16, generator=torch.Generator().manual_seed(3)) * torch.tensor([1.0, 0.004]).view(1, 2, 1, 1)
    out = photometric(raw.clone(), replace(NO_OPS, jitter=0.0, noise=1.0, noise_std=0.5), torch.Generator().manual_seed(0))
    added = (out - raw).std((0, 2, 3))
    spread = raw.std((2, 3)).mean(0)
    assert (added < spread).all() and (added > 0.05 * spread).all(), (added, spread)


def test_n_channel_shards_get_the_photometric_half_on_the_device_with_their_own_statistics():
    """data.channels=5 + data.augment_on=device: the workers crop, flip and normalise the arrays with the shards'
    statistics (ArrayViews); the trainer's half maps them back with the same statistics, jitters, renormalises."""
    from ssl_hybrid.data.augment import device_augment
    from ssl_hybrid.data.channels import Normalization
    from ssl_hybrid.data.views import build_transform, collate_views

    norm = Normalization((0.3, 0.3, 0.3, 0.3, 0.001), (0.1, 0.1, 0.1, 0.1, 0.0005), tuple("ABCDE"))
    cfg = simclr_cfg(augment_on="device", channels=5)
    workers = build_transform(cfg, norm)
    rng = np.random.default_rng(0)
    arrays = [(rng.uniform(0.2, 0.4, (5, 24, 24)) * 65535).astype(np.uint16) for _ in range(4)]
    for array in arrays:
        array[4] = rng.integers(40, 90, (24, 24))  # a dim channel: below 1/256 of the 16-bit range
    torch.manual_seed(0)
    batch = collate_views([dict(workers(a), key=str(i)) for i, a in enumerate(arrays)])
    assert batch["global_views"][0].shape == (4, 5, 16, 16)
    device_half = device_augment(cfg, norm)
    assert device_half is not None and device_half.normalised_inputs and device_half.mean == norm.mean
    out = device_half(batch, augment_generator(0, 0, 0))
    view = out["global_views"][0]
    assert view.shape == (4, 5, 16, 16) and torch.isfinite(view).all()
    assert not torch.equal(view, batch["global_views"][0])  # jittered
    # the dim channel stays at its own scale: normalised by its own statistics, neither erased nor blown up
    assert 0.05 < float(view[:, 4].std()) < 20
    assert device_augment(simclr_cfg(augment_on="workers", channels=5), norm) is None
