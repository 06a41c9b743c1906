"""Shared fixtures of the model tests: the registered models built once per module on first use, a batch of
images, and a way to switch modes on the shared models that always switches back."""

from __future__ import annotations

import pytest
import timm
import torch

import ssl_hybrid.models  # noqa: F401
from ssl_hybrid.models import HYBRID_VARIANTS, RESVIT_VARIANTS
from tests.models.models_helpers import IMG


class _BuiltOnFirstUse(dict):
    """name -> that model (no classifier, eval mode), built when a test first asks (the large ones take seconds)."""

    def __missing__(self, name: str) -> torch.nn.Module:
        assert name in HYBRID_VARIANTS + RESVIT_VARIANTS, name
        torch.manual_seed(0)
        self[name] = timm.create_model(name, num_classes=0).eval()
        return self[name]


@pytest.fixture(scope="module")
def built() -> dict[str, torch.nn.Module]:
    return _BuiltOnFirstUse()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def restore(built):
    """Give tests a way to switch modes on the shared models and always switch back."""
    touched = []

    def use(name):
        touched.append(built[name])
        return built[name]

    yield use
    for model in touched:
        model.set_attention("global")
        model.set_token_selection(1.0, None)
