"""Fixtures for the data-stage tests: a tiny good shard corpus, a small DataConfig, a cheap transform."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssl_hybrid.config import DataConfig
from tests.data.data_helpers import TinyViews, jpeg_bytes, write_manifest, write_tar


@pytest.fixture
def good_shards(tmp_path: Path) -> Path:
    """8 shards x 3 labeled samples (24 in all), keys s<shard>_<i>, labels 0..3, with manifest."""
    directory = tmp_path / "good"
    directory.mkdir()
    counts = {}
    for shard in range(8):
        samples = [{"__key__": f"s{shard}_{i}", "jpg": jpeg_bytes(shard * 10 + i), "cls": str((shard + i) % 4).encode()}
                   for i in range(3)]
        name = f"good-{shard:06d}.tar"
        write_tar(directory / name, samples)
        counts[name] = 3
    write_manifest(directory, counts, classes=["a", "b", "c", "d"])
    return directory


@pytest.fixture
def tiny_cfg():
    def make(train: str, **overrides) -> DataConfig:
        values = dict(train=str(train), num_workers=0, image_size=32, local_image_size=16, num_local_views=0,
                      views="dino", shuffle_buffer=5, resampled=False, max_skip_rate=0.5, skip_rate_min_samples=100)
        values.update(overrides)
        return DataConfig(**values)
    return make


@pytest.fixture
def tiny_views() -> TinyViews:
    return TinyViews()
