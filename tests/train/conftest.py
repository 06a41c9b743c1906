"""Fixtures for trainer tests; the helpers live in trainhelpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.trainhelpers import CORPUS


@pytest.fixture
def corpus() -> Path:
    if not (CORPUS / "manifest.json").exists():
        pytest.skip("embedded corpus data/pets37 not present (it ships with a source checkout)")
    return CORPUS
