"""Helpers for the evaluation tests: a small labeled train/test pair (the private cache is tests/conftest.py's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.eval.eval_helpers import make_labeled_folder


@pytest.fixture
def labeled_pair(tmp_path: Path) -> tuple[Path, Path]:
    """(train, test) folders: 3 classes x 6 train / 3 test images, 40 px."""
    return (make_labeled_folder(tmp_path / "train", 3, 6, seed=0),
            make_labeled_folder(tmp_path / "test", 3, 3, seed=1))
