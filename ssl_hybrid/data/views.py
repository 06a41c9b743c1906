"""Multi-view augmentations from lightly's transforms, and a collate that names the views.

``build_transform(data_cfg)`` returns ``callable(PIL.Image) -> {"global_views": [Tensor[3,H,W]...],
"local_views": [Tensor[3,h,w]...]}``:

- ``dino``: lightly ``DINOTransform`` -- 2 global crops of ``data.image_size`` + ``data.num_local_views``
  local crops of ``data.local_image_size`` (multi-crop);
- ``simclr``: lightly ``SimCLRTransform`` -- 2 global views; with ``data.num_local_views`` > 0, lightly
  ``SwaVTransform`` with the same augmentations makes the 2 global crops (``data.simclr_min_scale`` .. 1) and the
  local crops of ``data.local_image_size`` (``data.simclr_local_min_scale`` .. ``data.simclr_min_scale``);
- ``mae``: lightly ``MAETransform`` -- 1 light crop (MIM needs no second view).

With ``data.augment_on=device`` the workers only crop and flip (uint8 views) and the trainer applies the same
recipes' photometric ops batched (:mod:`ssl_hybrid.data.augment`).

Grayscale, palette, alpha and 16-bit images are converted to RGB first (lightly's colour jitter and the
3-channel normalisation expect RGB).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

VIEW_KINDS = ("dino", "simclr", "mae")


def _simclr_colour(data_cfg) -> dict:
    """The blur and colour settings both SimCLR transforms (plain and multi-crop) take."""
    return {
        "gaussian_blur": data_cfg.simclr_blur,
        "cj_strength": data_cfg.simclr_color_jitter,
        "cj_hue": data_cfg.simclr_hue,
        "random_gray_scale": data_cfg.simclr_grayscale,
    }


def _lightly_transform(data_cfg):
    from lightly.transforms import DINOTransform, MAETransform, SimCLRTransform, SwaVTransform

    if data_cfg.views == "dino":
        transform = DINOTransform(
            global_crop_size=data_cfg.image_size,
            local_crop_size=data_cfg.local_image_size,
            n_local_views=data_cfg.num_local_views,
        )
        return transform, 2
    if data_cfg.views == "simclr" and data_cfg.num_local_views > 0:
        transform = SwaVTransform(
            crop_sizes=(data_cfg.image_size, data_cfg.local_image_size),
            crop_counts=(2, data_cfg.num_local_views),
            crop_min_scales=(data_cfg.simclr_min_scale, data_cfg.simclr_local_min_scale),
            crop_max_scales=(1.0, data_cfg.simclr_min_scale),
            **_simclr_colour(data_cfg),
        )
        return transform, 2
    if data_cfg.views == "simclr":
        return SimCLRTransform(
            input_size=data_cfg.image_size, min_scale=data_cfg.simclr_min_scale, **_simclr_colour(data_cfg)
        ), 2
    if data_cfg.views == "mae":
        return MAETransform(input_size=data_cfg.image_size), 1
    raise ValueError(f"data.views must be one of {', '.join(VIEW_KINDS)}, got {data_cfg.views!r}")


class NamedViews:
    """PIL image -> lightly's views split into named global and local ones (a class, not a closure, so
    DataLoader workers can pickle it). Not lightly's ``MultiViewTransform``, which returns a plain list."""

    def __init__(self, transform: Callable, num_global: int):
        self.transform, self.num_global = transform, num_global

    def __call__(self, image) -> dict:
        if image.mode != "RGB":
            image = image.convert("RGB")
        views = self.transform(image)
        return {"global_views": list(views[: self.num_global]), "local_views": list(views[self.num_global :])}


def build_transform(data_cfg, norm=None) -> Callable:
    """The workers' transform. RGB photos: lightly's whole view transforms, or with ``data.augment_on=device``
    only their crops and flips (the photometric rest runs batched in the trainer, :mod:`ssl_hybrid.data.augment`).
    With ``norm`` (N-channel shards, ``data.channels``): crops, flips and per-channel normalisation of the arrays
    (their intensity jitter, blur and noise run batched in the trainer with ``data.augment_on=device``)."""
    if norm is not None:
        from ssl_hybrid.data.channels import ArrayViews

        return ArrayViews(data_cfg, norm)
    if getattr(data_cfg, "augment_on", "workers") == "device":
        from ssl_hybrid.data.augment import build_batch_augment

        return build_batch_augment(data_cfg)[0]
    return NamedViews(*_lightly_transform(data_cfg))


def collate_views(samples: list[dict]) -> dict:
    """[{global_views, local_views, key, label?}] -> {global_views: [Tensor[B,3,H,W]] per view,
    local_views: [Tensor[B,3,h,w]] per view, key: [str], label: Tensor[B] (only if every sample has one)}."""
    if not samples:
        raise ValueError("collate_views needs at least one sample")
    batch: dict[str, Any] = {
        "global_views": [torch.stack(views) for views in zip(*(s["global_views"] for s in samples))],
        "local_views": [torch.stack(views) for views in zip(*(s["local_views"] for s in samples))],
        "key": [s["key"] for s in samples],
    }
    if all("label" in s for s in samples):
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return batch
