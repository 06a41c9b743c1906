"""Plain helpers for the data-stage tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch


def jpeg_bytes(seed: int, size: tuple[int, int] = (24, 20), mode: str = "RGB") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8).squeeze()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


class TinyViews:
    """Cheap stand-in for the lightly transforms: one 8x8 view plus one random number, so augmentation
    seeding is still observable (module level so it pickles under any start method)."""

    def __call__(self, image) -> dict:
        from torchvision.transforms.functional import pil_to_tensor

        view = pil_to_tensor(image.resize((8, 8))).float() / 255  # [3, 8, 8]
        return {"global_views": [view + torch.rand(1)], "local_views": []}


class NicenessViews:
    """Reports the niceness of the process that made the view (the view is one number: ``os.nice(0)``)."""

    def __call__(self, image) -> dict:
        import os

        return {"global_views": [torch.full((1,), float(os.nice(0)))], "local_views": []}


def write_tar(path: Path, samples: list[dict]) -> Path:
    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def write_manifest(directory: Path, counts: dict[str, int], classes=None) -> None:
    manifest = {"format": "ssl_hybrid-shards/1", "source": "test", "num_samples": sum(counts.values()),
                "shards": [{"name": name, "samples": n, "sha256": ""} for name, n in counts.items()],
                "classes": classes, "skipped": [], "shard_size": max(counts.values())}
    (directory / "manifest.json").write_text(json.dumps(manifest))
