"""Multi-view transforms built from lightly, grayscale handling, and the named collate."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_hybrid.config import DataConfig
from ssl_hybrid.data.views import build_transform, collate_views


def small_cfg(**overrides) -> DataConfig:
    values = dict(image_size=32, local_image_size=16, num_local_views=3, views="dino")
    values.update(overrides)
    return DataConfig(**values)


@pytest.mark.parametrize("kind,num_local,globals_,locals_", [("dino", 3, 2, 3), ("simclr", 0, 2, 0), ("simclr", 3, 2, 3),
                                                            ("mae", 0, 1, 0)])
def test_view_counts_and_shapes(kind: str, num_local: int, globals_: int, locals_: int):
    transform = build_transform(small_cfg(views=kind, num_local_views=num_local))
    views = transform(Image.new("RGB", (50, 40), (200, 30, 30)))
    assert len(views["global_views"]) == globals_ and len(views["local_views"]) == locals_
    assert all(tuple(v.shape) == (3, 32, 32) for v in views["global_views"])
    assert all(tuple(v.shape) == (3, 16, 16) for v in views["local_views"])


def test_matches_lightly_reference_under_the_same_seed():
    from lightly.transforms import DINOTransform

    image = Image.effect_noise((48, 40), 60).convert("RGB")
    reference = DINOTransform(global_crop_size=32, local_crop_size=16, n_local_views=3)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expected = reference(image)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    ours = build_transform(small_cfg())(image)
    for a, b in zip(expected, ours["global_views"] + ours["local_views"]):
        assert torch.equal(a, b)


def test_simclr_views_take_the_crop_scale_blur_and_colour_settings():
    from lightly.transforms import SimCLRTransform

    image = Image.effect_noise((48, 40), 60).convert("RGB")
    reference = SimCLRTransform(input_size=32, min_scale=0.5, gaussian_blur=0.0, cj_strength=0.3)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = reference(image)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    ours = build_transform(small_cfg(views="simclr", num_local_views=0, simclr_min_scale=0.5, simclr_blur=0.0,
                                     simclr_color_jitter=0.3))(image)
    assert all(torch.equal(a, b) for a, b in zip(expected, ours["global_views"]))
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    default = build_transform(small_cfg(views="simclr", num_local_views=0))(image)
    assert not all(torch.equal(a, b) for a, b in zip(expected, default["global_views"]))  # the settings matter


def test_simclr_multicrop_views_are_lightly_swav_crops_with_the_simclr_settings():
    from lightly.transforms import SwaVTransform

    image = Image.effect_noise((48, 40), 60).convert("RGB")
    reference = SwaVTransform(crop_sizes=(32, 16), crop_counts=(2, 3), crop_min_scales=(0.5, 0.1),
                              crop_max_scales=(1.0, 0.5), gaussian_blur=0.0, cj_strength=0.3, cj_hue=0.0,
                              random_gray_scale=0.0)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = reference(image)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    ours = build_transform(small_cfg(views="simclr", num_local_views=3, simclr_min_scale=0.5,
                                     simclr_local_min_scale=0.1, simclr_blur=0.0, simclr_color_jitter=0.3,
                                     simclr_hue=0.0, simclr_grayscale=0.0))(image)
    assert len(expected) == 5
    assert all(torch.equal(a, b) for a, b in zip(expected, ours["global_views"] + ours["local_views"]))
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    with_hue = build_transform(small_cfg(views="simclr", num_local_views=3, simclr_min_scale=0.5,
                                         simclr_local_min_scale=0.1, simclr_blur=0.0, simclr_color_jitter=0.3))(image)
    assert not all(torch.equal(a, b) for a, b in zip(expected, with_hue["global_views"] + with_hue["local_views"]))


@pytest.mark.parametrize("num_local", [0, 3])  # SimCLRTransform, SwaVTransform
@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16", "CMYK"])
def test_non_rgb_inputs_become_three_channels(mode: str, num_local: int):
    image = Image.new(mode, (40, 40))
    views = build_transform(small_cfg(views="simclr", num_local_views=num_local))(image)
    assert all(v.shape[0] == 3 for v in views["global_views"] + views["local_views"])


def test_collate_names_the_views():
    samples = [{"global_views": [torch.full((3, 4, 4), float(i)), torch.zeros(3, 4, 4)],
                "local_views": [torch.ones(3, 2, 2)], "key": f"k{i}", "label": i} for i in range(3)]
    batch = collate_views(samples)
    assert [tuple(v.shape) for v in batch["global_views"]] == [(3, 3, 4, 4), (3, 3, 4, 4)]
    assert torch.equal(batch["global_views"][0][:, 0, 0, 0], torch.tensor([0.0, 1.0, 2.0]))
    assert [tuple(v.shape) for v in batch["local_views"]] == [(3, 3, 2, 2)]
    assert batch["key"] == ["k0", "k1", "k2"] and torch.equal(batch["label"], torch.tensor([0, 1, 2]))
    del samples[1]["label"]
    assert "label" not in collate_views(samples)
    with pytest.raises(ValueError):
        collate_views([])
