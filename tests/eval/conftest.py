"""Helpers for the evaluation tests: a small labeled train/test pair and a cheap feature cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval_helpers import make_labeled_folder


@pytest.fixture
def labeled_pair(tmp_path: Path) -> tuple[Path, Path]:
    """(train, test) folders: 3 classes x 6 train / 3 test images, 40 px."""
    return (make_labeled_folder(tmp_path / "train", 3, 6, seed=0),
            make_labeled_folder(tmp_path / "test", 3, 3, seed=1))


@pytest.fixture(autouse=True)
def _private_feature_cache(tmp_path: Path, monkeypatch):
    """Never read or write the user's ~/.cache from tests."""
    monkeypatch.setenv("SSL_HYBRID_CACHE", str(tmp_path / "cache"))
