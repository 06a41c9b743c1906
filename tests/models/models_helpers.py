"""Parametrization shared by the model tests: every registered variant, the large ones marked ``slow``.

The quick loop (``pytest -m "not slow"``) checks each test on the nano and tiny variants; small and base run
the same code at larger widths and depths and cost seconds each, so they run in the full suite (CI) only.
"""

from __future__ import annotations

import pytest

from ssl_hybrid.models import HYBRID_VARIANTS, RESVIT_VARIANTS

LARGE_SIZES = ("_small", "_base")


def size_marks(name: str) -> list:
    return [pytest.mark.slow] if name.endswith(LARGE_SIZES) else []


def variant_params(names) -> list:
    return [pytest.param(name, id=name, marks=size_marks(name)) for name in names]


HYBRID_CASES = variant_params(HYBRID_VARIANTS)
RESVIT_CASES = variant_params(RESVIT_VARIANTS)
# Every preset of the one family: the efficiency features (attention modes, token selection) must work on each.
FAMILY_CASES = HYBRID_CASES + RESVIT_CASES

IMG = 64  # the size the model tests run at
GRID = IMG // 16  # its token grid (stride 16)
