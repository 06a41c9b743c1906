"""Augmentations split in two: geometry per image in the data workers, photometry batched on the training device.

Why this split. A random resized crop reads a different region of each differently sized image, so it cannot be
one batched op without padding every image to the largest; cropping in the workers is cheap (PIL resizes only the
crop) and shrinks what crosses the worker pipe to the crop size, sent as ``uint8`` (4x less than float32). The
photometric ops (colour jitter with its hue step, grayscale, blur, solarize, noise) cost most of today's per-image
lightly path and are the same tensor math for every image, so they run once per view on the whole batch, on the
GPU when there is one (main process on CPU), with per-sample random parameters.

- :class:`CropFlip` (workers): image -> ``{"global_views": [uint8 Tensor[C,H,W]], "local_views": [...]}``,
  lightly's random resized crop (same scales, interpolation) + horizontal flip, drawn from the global RNGs that the
  stream seeds per sample (as lightly's transforms are).
- :class:`BatchAugment` (device): the batch of those views -> float, augmented, normalised views. Its random
  parameters come from a ``torch.Generator`` that :func:`augment_generator` seeds from (seed, step, rank), like the
  trainer's masks: the draws are a pure function of checkpointed state, so a resumed run repeats them exactly.

Recipes (:func:`view_recipes`) carry lightly's parameters and probabilities for each view of ``data.views``:

- RGB: ``ColorJitter(b, c, s, h)`` applied with probability 0.8, its four ops in a random order per image, then
  ``RandomGrayscale``, lightly's ``GaussianBlur`` (sigma U(0.1, 2)), ``RandomSolarization`` (threshold 128),
  ImageNet normalisation -- the order of lightly's ``SimCLRViewTransform`` / ``DINOViewTransform``.
- any other channel count C: per-channel intensity jitter (brightness x U(1-b, 1+b), contrast towards the
  channel's mean, gamma x**e with log e uniform in [-log(1+g), log(1+g)], each channel drawn alone) with the RGB
  recipe's probability and strengths, the same blur, and additive gaussian noise (relative to each channel's
  spread); no hue, saturation, grayscale or solarize (they mean nothing without RGB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, what PIL's convert("L") and torchvision's rgb_to_grayscale use
SOLARIZE_THRESHOLD = 128 / 255  # PIL's ImageOps.solarize(threshold=128) inverts values >= 128


@dataclass(frozen=True)
class ViewRecipe:
    """One view's augmentations; every photometric op is off unless set (view_recipes sets lightly's values)."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    interpolation: str = "bilinear"  # lightly's DINO and MAE crops are bicubic, SimCLR's and SwaV's bilinear
    hflip: float = 0.5
    jitter: float = 0.0  # probability of the colour (RGB) / intensity (other C) jitter
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    gamma: float = 0.0  # other C only
    grayscale: float = 0.0
    blur: float = 0.0
    sigmas: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0
    noise: float = 0.0  # probability of additive gaussian noise, std U(0, noise_std) (other C only by default)
    noise_std: float = 0.0  # relative to each channel's std in the image


def _jittered(view: ViewRecipe, strength: float, bright: float, contrast: float, sat: float, hue: float) -> ViewRecipe:
    # lightly multiplies every jitter range by cj_strength
    return replace(
        view, brightness=strength * bright, contrast=strength * contrast, saturation=strength * sat, hue=strength * hue
    )


def view_recipes(data_cfg: Any, channels: int | None = None) -> tuple[list[ViewRecipe], list[ViewRecipe]]:
    """(global, local) recipes with the parameters ``ssl_hybrid.data.views`` hands lightly for ``data.views``,
    for ``channels`` (default ``data.channels``) channels."""
    channels = data_cfg.channels if channels is None else channels
    size, local_size, n_local = data_cfg.image_size, data_cfg.local_image_size, data_cfg.num_local_views
    if data_cfg.views == "dino":  # DINOTransform defaults
        view = ViewRecipe(size=size, scale=(0.4, 1.0), interpolation="bicubic", jitter=0.8, blur=1.0, grayscale=0.2)
        view = _jittered(view, 0.5, 0.8, 0.8, 0.4, 0.2)
        globals_ = [view, replace(view, blur=0.1, solarize=0.2)]
        local = replace(view, size=local_size, scale=(0.05, 0.4), blur=0.5)
    elif data_cfg.views == "simclr":
        view = ViewRecipe(
            size=size,
            scale=(data_cfg.simclr_min_scale, 1.0),
            jitter=0.8,
            blur=data_cfg.simclr_blur,
            grayscale=data_cfg.simclr_grayscale,
        )
        view = _jittered(view, data_cfg.simclr_color_jitter, 0.8, 0.8, 0.8, data_cfg.simclr_hue)
        globals_ = [view, view]
        local = replace(view, size=local_size, scale=(data_cfg.simclr_local_min_scale, data_cfg.simclr_min_scale))
    elif data_cfg.views == "mae":  # MAETransform: crop + flip only
        view = ViewRecipe(size=size, scale=(0.2, 1.0), interpolation="bicubic")
        globals_, local, n_local = [view], view, 0
    else:
        raise ValueError(f"data.views must be one of dino, simclr, mae, got {data_cfg.views!r}")
    locals_ = [local] * n_local
    if channels != 3:
        return [_for_channels(r) for r in globals_], [_for_channels(r) for r in locals_]
    return globals_, locals_


def _for_channels(recipe: ViewRecipe) -> ViewRecipe:
    """The RGB recipe turned into per-channel intensity ops: the colour-only ops go, gamma and noise come in."""
    if recipe.jitter == 0.0:
        return recipe
    # No lightly counterpart: gamma spans half the contrast range, noise (relative to each channel's spread) as
    # often as grayscale in the RGB recipe; both mild, so a channel's signal stays what tells images apart.
    return replace(
        recipe,
        saturation=0.0,
        hue=0.0,
        grayscale=0.0,
        solarize=0.0,
        gamma=recipe.contrast / 2,
        noise=0.2,
        noise_std=0.03,
    )


# ---------------------------------------------------------------------------------------------
# Workers: decode has happened; crop + flip per image
# ---------------------------------------------------------------------------------------------


class CropFlip:
    """Image (PIL or Tensor[C,H,W]) -> named uint8/int views, cropped and flipped (picklable for workers)."""

    def __init__(self, global_recipes: Sequence[ViewRecipe], local_recipes: Sequence[ViewRecipe], channels: int):
        from torchvision.transforms import v2

        def crop(r: ViewRecipe):
            mode = v2.InterpolationMode.BICUBIC if r.interpolation == "bicubic" else v2.InterpolationMode.BILINEAR
            return v2.Compose(
                [
                    v2.RandomResizedCrop(r.size, scale=r.scale, interpolation=mode, antialias=True),
                    v2.RandomHorizontalFlip(r.hflip),
                ]
            )

        self.globals = [crop(r) for r in global_recipes]
        self.locals = [crop(r) for r in local_recipes]
        self.channels = channels

    def __call__(self, image) -> dict:
        from torchvision.transforms.v2 import functional as TF

        if not isinstance(image, torch.Tensor) and self.channels == 3 and image.mode != "RGB":
            image = image.convert("RGB")  # as ssl_hybrid.data.views does for lightly

        def view(transform) -> torch.Tensor:
            out = transform(image)
            return out if isinstance(out, torch.Tensor) else TF.pil_to_tensor(out)

        return {"global_views": [view(t) for t in self.globals], "local_views": [view(t) for t in self.locals]}


# ---------------------------------------------------------------------------------------------
# Device: batched photometric ops with per-sample parameters
# ---------------------------------------------------------------------------------------------


def augment_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The augmentation draws of a step are a pure function of (seed, step, rank): exact resume needs no new state."""
    state = np.random.SeedSequence([seed, step, rank, 0x61756774]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Integer images -> float32 in [0, 1] by their dtype's range; float images are taken as already in [0, 1]."""
    if x.is_floating_point():
        return x.to(torch.float32, copy=True)  # the ops below write into it
    top = {torch.uint8: 255.0, torch.int16: 32767.0, torch.int32: 65535.0}.get(x.dtype)
    if top is None and x.dtype == getattr(torch, "uint16", None):
        top = 65535.0
    if top is None:
        raise TypeError(f"cannot scale {x.dtype} images to [0, 1]")
    return x.float().div_(top)


def _uniform(n: int, low: float, high: float, g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand((n, *shape), generator=g).mul_(high - low).add_(low)


def _factor(n: int, amount: float, g: torch.Generator, *shape: int) -> torch.Tensor:
    """torchvision ColorJitter's factor range: U(max(0, 1 - amount), 1 + amount)."""
    return _uniform(n, max(0.0, 1.0 - amount), 1.0 + amount, g, *shape)


def _per_image(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[n] or [n, C] parameters -> broadcastable over x [n, C, H, W], on x's device."""
    values = values.to(x.device, non_blocking=True)
    return values.view(*values.shape, *([1] * (x.dim() - values.dim())))


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend with a per-sample factor: factor * x + (1 - factor) * other, clamped to [0, 1]."""
    return torch.lerp(other, x, _per_image(factor, x)).clamp_(0.0, 1.0)


def grayscale(x: torch.Tensor) -> torch.Tensor:  # [n, 3, H, W] -> [n, 1, H, W]
    weights = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_image(factor, x)).clamp_(0.0, 1.0)  # torchvision: a blend with black


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """RGB: towards the mean gray level (torchvision); other C: towards each channel's own mean (factor [n, C])."""
    mean = grayscale(x).mean((1, 2, 3), keepdim=True) if factor.dim() == 1 else x.mean((2, 3), keepdim=True)
    return _blend(x, mean, factor)


def saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (RGB -> HSV, shift H, back) with a per-sample shift, in fewer passes.

    With V = max, S = (max - min) / max, the way back to RGB needs only max, delta = max - min and the shifted hue:
    channel n (R 5, G 3, B 1) = max - delta * clamp(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6 (the closed form of
    the HSV sector table), so no HSV image is built; agrees with torchvision to float rounding (tested)."""
    r, g, b = x.unbind(1)  # [n, H, W] each
    minc, maxc = torch.aminmax(x, dim=1)
    delta = maxc - minc
    safe = delta.clamp(min=1e-12)  # delta 0 (gray): any hue gives back max, as torchvision's where() does
    h6 = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h6 += 6 * _per_image(shift, h6)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n).remainder_(6.0)
        channels.append(maxc - delta * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(channels, 1)


def gamma(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=0.0).pow_(_per_image(exponent, x))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable gaussian blur with one sigma per image ([n]); edges replicated (as PIL's blur does).

    One depthwise convolution per axis over all n*C planes, each plane with its image's kernel."""
    n, c, h, w = x.shape
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    sigma = sigma.to(x.device, x.dtype, non_blocking=True)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))  # [n, K]
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*C, K]
    planes = x.reshape(1, n * c, h, w)
    planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=n * c)
    planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None], groups=n * c)
    return planes.view(n, c, h, w)


def solarize(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= SOLARIZE_THRESHOLD, 1.0 - x, x)


def _apply(x: torch.Tensor, chosen: torch.Tensor, op, *params: torch.Tensor) -> torch.Tensor:
    """op on the images where ``chosen`` ([n] bool, CPU) is set, with their parameters; the rest unchanged."""
    index = chosen.nonzero().flatten()
    if len(index) == 0:
        return x
    if len(index) == len(chosen):
        return op(x, *params)
    device_index = index.to(x.device, non_blocking=True)
    x[device_index] = op(x[device_index], *(p[index] for p in params))
    return x


def colour_jitter(x: torch.Tensor, recipe: ViewRecipe, g: torch.Generator) -> torch.Tensor:
    """RandomApply([ColorJitter], p): per image a random order of brightness, contrast, saturation, hue.

    The images are sorted by their order of ops (24 orders + "not applied"), so that each group is a contiguous
    slice that the ops rewrite in place: one gather in, one out, instead of a gather and scatter per op."""
    n = len(x)
    applied = torch.rand(n, generator=g) < recipe.jitter
    order = torch.rand(n, 4, generator=g).argsort(1)  # torchvision draws randperm(4) per call
    ops = [
        (brightness, _factor(n, recipe.brightness, g), recipe.brightness > 0),
        (contrast, _factor(n, recipe.contrast, g), recipe.contrast > 0),
        (saturation, _factor(n, recipe.saturation, g), recipe.saturation > 0),
        (hue, _uniform(n, -recipe.hue, recipe.hue, g), recipe.hue > 0),  # torchvision skips a 0 range
    ]
    group = torch.where(applied, (order * torch.tensor([64, 16, 4, 1])).sum(1), -1)
    sorted_group, by_group = group.sort(stable=True)
    x = x[by_group.to(x.device)]
    start = 0
    for value, count in zip(*torch.unique_consecutive(sorted_group, return_counts=True)):
        part, members = slice(start, start + int(count)), by_group[start : start + int(count)]
        start += int(count)
        if value < 0:
            continue
        for number in order[members[0]].tolist():
            op, params, active = ops[number]
            if active:
                x[part] = op(x[part], params[members])
    return x[by_group.argsort().to(x.device)]


def intensity_jitter(x: torch.Tensor, recipe: ViewRecipe, g: torch.Generator) -> torch.Tensor:
    """Any channel count: brightness, contrast, gamma with one factor per image and channel."""
    n, c = x.shape[:2]
    applied = torch.rand(n, generator=g) < recipe.jitter
    b, k = _factor(n, recipe.brightness, g, c), _factor(n, recipe.contrast, g, c)
    gam = _uniform(n, math.log(1 / (1 + recipe.gamma)), math.log(1 + recipe.gamma), g, c).exp_()
    if recipe.brightness > 0:
        x = _apply(x, applied, brightness, b)
    if recipe.contrast > 0:
        x = _apply(x, applied, contrast, k)
    if recipe.gamma > 0:
        x = _apply(x, applied, gamma, gam)
    return x


def add_noise(x: torch.Tensor, std: torch.Tensor, seed: int) -> torch.Tensor:
    """Gaussian noise with a per-image std relative to each channel's own spread (a dim fluorescence channel at
    1/1000 of the range must not drown in noise sized for a bright one); drawn by a generator on x's device."""
    device_g = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randn(x.shape, generator=device_g, device=x.device, dtype=x.dtype)
    spread = x.std((2, 3), keepdim=True)  # [n, C, 1, 1]
    return (x + noise * spread * _per_image(std, x)).clamp_(0.0, 1.0)


def photometric(x: torch.Tensor, recipe: ViewRecipe, g: torch.Generator) -> torch.Tensor:
    """One view, [n, C, H, W] float in [0, 1] -> augmented, same range; lightly's order of ops.

    Every draw is made whether or not an op applies, so a view always takes the same number of draws."""
    n, c = x.shape[:2]
    rgb = c == 3
    x = colour_jitter(x, recipe, g) if rgb else intensity_jitter(x, recipe, g)
    gray = torch.rand(n, generator=g) < recipe.grayscale
    if rgb and recipe.grayscale > 0:
        x = _apply(x, gray, lambda v: grayscale(v).repeat(1, 3, 1, 1))  # not expand(): later ops write in place
    blurred = torch.rand(n, generator=g) < recipe.blur
    sigma = _uniform(n, *recipe.sigmas, g)
    if recipe.blur > 0:
        radius = math.ceil(3 * recipe.sigmas[1])  # one kernel size for the batch: 3 sigma of the widest
        x = _apply(x, blurred, lambda v, s: gaussian_blur(v, s, radius), sigma)
    noisy = torch.rand(n, generator=g) < recipe.noise
    std = _uniform(n, 0.0, recipe.noise_std, g)
    noise_seed = int(torch.randint(2**62, (1,), generator=g))
    if recipe.noise > 0 and recipe.noise_std > 0:
        x = _apply(x, noisy, lambda v, s: add_noise(v, s, noise_seed), std)
    solarized = torch.rand(n, generator=g) < recipe.solarize
    if rgb and recipe.solarize > 0:
        x = _apply(x, solarized, solarize)
    return x


class BatchAugment:
    """Batch of worker views (any int/float dtype, any device) -> float32 augmented, normalised views in place of them.

    ``mean``/``std`` are per channel (ImageNet's for RGB, as lightly normalises). ``normalised_inputs``: the
    workers already normalised the views with them (N-channel arrays), so they are mapped back to [0, 1] first."""

    def __init__(
        self,
        global_recipes: Sequence[ViewRecipe],
        local_recipes: Sequence[ViewRecipe],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        normalised_inputs: bool = False,
    ):
        self.global_recipes, self.local_recipes = list(global_recipes), list(local_recipes)
        self.mean, self.std = tuple(mean), tuple(std)
        self.normalised_inputs = normalised_inputs

    def view(self, x: torch.Tensor, recipe: ViewRecipe, g: torch.Generator) -> torch.Tensor:
        if x.shape[1] != len(self.mean):
            raise ValueError(f"views have {x.shape[1]} channels, the normalisation {len(self.mean)}")
        x = to_unit(x)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        if self.normalised_inputs:
            x = x.mul_(std).add_(mean)
        return photometric(x, recipe, g).sub_(mean).div_(std)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        views = {
            key: [self.view(x, r, generator) for x, r in zip(batch[key], recipes, strict=True)]
            for key, recipes in (("global_views", self.global_recipes), ("local_views", self.local_recipes))
        }
        return dict(batch, **views)


def build_batch_augment(
    data_cfg: Any, channels: int | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> tuple[CropFlip, BatchAugment]:
    """The worker half and the device half of ``data.views``'s augmentations for ``channels`` (default
    ``data.channels``) channels; RGB views are normalised with ImageNet's mean/std, as lightly does."""
    channels = data_cfg.channels if channels is None else channels
    globals_, locals_ = view_recipes(data_cfg, channels)
    if mean is None or std is None:
        if channels != 3:
            raise ValueError(f"{channels}-channel views need their per-channel mean and std")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return CropFlip(globals_, locals_, channels), BatchAugment(globals_, locals_, mean, std)


def device_augment(data_cfg: Any, norm: Any = None) -> BatchAugment | None:
    """The trainer's half for ``data.augment_on=device`` (the workers' half is ``views.build_transform``); None
    when lightly's per-image transforms do everything in the workers. ``norm``: the per-channel normalisation of
    N-channel shards (``data.channels.Normalization``), whose views the workers already normalised with it."""
    if getattr(data_cfg, "augment_on", "workers") != "device":
        return None
    if norm is None:
        return build_batch_augment(data_cfg)[1]
    global_recipes, local_recipes = view_recipes(data_cfg, norm.channels)
    return BatchAugment(global_recipes, local_recipes, norm.mean, norm.std, normalised_inputs=True)
