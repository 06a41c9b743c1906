"""Shared fixtures: a tiny temporary image folder made with PIL, a temporary run directory,
and paths to the real development datasets (tests using them skip cleanly when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATASETS = Path(os.environ.get("SSL_HYBRID_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))


def _make_image(path: Path, rng: np.random.Generator, size: tuple[int, int], class_index: int) -> None:
    from PIL import Image

    height, width = size
    # Class-dependent colour + noise, so classes are separable but images are not identical.
    base = np.array([(class_index * 70) % 256, (class_index * 130 + 40) % 256, (class_index * 200 + 90) % 256])
    pixels = np.clip(base + rng.normal(0, 40, size=(height, width, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 classes x 6 images (64x48 JPEG/PNG mixed) in class sub-folders."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for class_index, name in enumerate(["alpha", "beta", "gamma"]):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(6):
            suffix = ".png" if i % 3 == 0 else ".jpg"
            _make_image(folder / f"{name}_{i}{suffix}", rng, (48, 64), class_index)
    return root


@pytest.fixture
def flat_image_folder(tmp_path: Path) -> Path:
    """10 unlabeled JPEG images in one folder."""
    rng = np.random.default_rng(1)
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(10):
        _make_image(root / f"img_{i:03d}.jpg", rng, (40 + i, 56), i % 4)
    return root


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    """A temporary train.output_dir."""
    path = tmp_path / "runs"
    path.mkdir()
    return path


def shared_dataset(name: str) -> Path:
    """Path to ../shared/datasets/<name>, or skip the test cleanly when it is absent."""
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.skip(f"development dataset {name} not found at {path}")
    return path


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons (mixed precision, device); tests that build Accelerators
    with different settings in one pytest process must not see each other's state."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
