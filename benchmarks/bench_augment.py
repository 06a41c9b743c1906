"""``python benchmarks/bench_augment.py``: augmentation throughput, batched tensor ops vs the per-image lightly path.

For each image size and recipe, on the same decoded photos of the embedded corpus (data/pets37; decoding is the
same in both paths and left out):

- ``lightly``: today's path (``data.augment_on=workers``), ``ssl_hybrid.data.views.build_transform`` per image,
  as a data worker runs it; RGB only (PIL cannot take 5 channels);
- ``batched``: the ``data.augment_on=device`` path on the CPU, all of it in one process: ``CropFlip`` per image
  (the workers' half), the collate, then ``BatchAugment`` on the batch (the device half);
- ``batched_device_half``: the ``BatchAugment`` call alone, what the training process pays per batch.

img/s per core = images / CPU seconds of this process with ``--threads`` torch threads (1 by default: a data
worker is one core), the load-robust figure on a shared machine; the wall-clock figures are kept next to it.
Sides alternate (lightly, batched, lightly, ...) and the medians are taken. C=5 uses 16-bit random images.
"""

from __future__ import annotations

import argparse
import os
import statistics
from types import SimpleNamespace
from typing import Any

import torch
from timing import significant, time_alternating

from ssl_hybrid.config import DEFAULT_CORPUS
from ssl_hybrid.data.augment import augment_generator, build_batch_augment
from ssl_hybrid.data.views import build_transform, collate_views
from ssl_hybrid.machine import machine_info

# lightly's SimCLR defaults at a given size, and the quickstart's multi-crop recipe (recipes/quickstart.yaml)
RECIPES = {
    "simclr_lightly": dict(views="simclr", num_local_views=0, simclr_min_scale=0.08, simclr_blur=0.5,
                           simclr_color_jitter=1.0, simclr_hue=0.2, simclr_grayscale=0.2),
    "quickstart": dict(views="simclr", num_local_views=4, simclr_min_scale=0.25, simclr_blur=0.0,
                       simclr_color_jitter=0.3, simclr_hue=0.2, simclr_grayscale=0.2),
    "dino": dict(views="dino", num_local_views=0),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="96,224", help="global view sizes (local views: size / 2)")
    parser.add_argument("--recipes", default="simclr_lightly", help=f"comma list of {', '.join(RECIPES)}")
    parser.add_argument("--channels", default="3,5", help="channel counts (the lightly side runs for 3 only)")
    parser.add_argument("--batch", type=int, default=64, help="images per timed batch")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds (medians reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = per core, as one data worker)")


def data_config(recipe: str, size: int) -> SimpleNamespace:
    return SimpleNamespace(image_size=size, local_image_size=size // 2, simclr_local_min_scale=0.05,
                           **{"simclr_min_scale": 0.08, **RECIPES[recipe]})


def photos(count: int) -> list:
    """Decoded RGB photos of the embedded corpus (what the workers hand the transform)."""
    from ssl_hybrid.data.stream import decode_image, read_shard, resolve_shards

    images: list = []
    for url in resolve_shards(str(DEFAULT_CORPUS)):
        for sample in read_shard(url):
            image = decode_image(sample)
            if image is not None:
                images.append(image.convert("RGB"))
            if len(images) == count:
                return images
    return images


def stacks(count: int, channels: int, size: int = 320) -> list[torch.Tensor]:
    """16-bit random C-channel images (tensors, as an N-channel decoder hands them over)."""
    g = torch.Generator().manual_seed(channels)
    return [torch.randint(0, 2**16, (channels, size, size - 40), generator=g, dtype=torch.int32) for _ in range(count)]


def sides(cfg: SimpleNamespace, images: list, channels: int) -> dict[str, Any]:
    stats = (([0.5] * channels, [0.25] * channels) if channels != 3 else (None, None))
    crop_flip, batch_augment = build_batch_augment(cfg, channels, *stats)
    keyed = [{"key": str(i)} for i in range(len(images))]

    def worker_half() -> dict:
        return collate_views([dict(crop_flip(im), **k) for im, k in zip(images, keyed)])

    cropped = worker_half()
    out: dict[str, Any] = {
        "batched": lambda: batch_augment(worker_half(), augment_generator(0, 0, 0)),
        "batched_device_half": lambda: batch_augment(cropped, augment_generator(0, 0, 0)),
    }
    if channels == 3:
        lightly = build_transform(cfg)
        out["lightly"] = lambda: collate_views([dict(lightly(im), **k) for im, k in zip(images, keyed)])
    return out


def per_core(times: dict[str, list[float]], images: int) -> dict[str, float]:
    return {
        "img_per_cpu_s": significant(images / statistics.median(times["cpu"])),
        "img_per_wall_s": significant(images / statistics.median(times["wall"])),
    }


def run_benchmark(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()
    rgb = photos(args.batch)
    rows = []
    for recipe in args.recipes.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            for channels in (int(c) for c in args.channels.split(",")):
                images = rgb if channels == 3 else stacks(args.batch, channels)
                cfg = data_config(recipe, size)
                times = time_alternating(sides(cfg, images, channels), iters=args.repeats, warmup=1)
                row = {"recipe": recipe, "size": size, "channels": channels, "batch": len(images),
                       "views_per_image": 2 + cfg.num_local_views}
                row.update({name: per_core(t, len(images)) for name, t in times.items()})
                if "lightly" in row:
                    row["speedup_cpu"] = significant(row["batched"]["img_per_cpu_s"] / row["lightly"]["img_per_cpu_s"])
                    row["speedup_wall"] = significant(
                        row["batched"]["img_per_wall_s"] / row["lightly"]["img_per_wall_s"])
                rows.append(row)
                print(row, flush=True)
    return {
        "benchmark": "augment",
        "threads": args.threads,
        "repeats": args.repeats,
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "machine": machine_info("cpu", packages=("torch", "torchvision", "lightly", "PIL")),
        "rows": rows,
    }


if __name__ == "__main__":
    import sys

    import timing

    timing.main(sys.modules[__name__])
