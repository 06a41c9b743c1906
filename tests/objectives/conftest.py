"""A tiny stand-in backbone with the hybrid backbone's contract, for testing objective math in isolation.

The real backbone (ssl_hybrid.models) is exercised in test_combine.py; this one keeps the reference
checks independent of it and fast.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyBackbone(nn.Module):
    """Patch embedding + one transformer block; forward_masked keeps visible tokens only (MAE)."""

    patch_size = 16

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.num_features = self.embed_dim = dim
        self.patch = nn.Conv2d(3, dim, 16, 16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.block = Block(dim, 2)
        self.norm = nn.LayerNorm(dim)

    def _tokens(self, x):
        return self.patch(x).flatten(2).transpose(1, 2)  # [B, N, C]

    def _encode(self, patches):
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return self.norm(self.block(torch.cat([cls, patches], 1)))

    def forward_features(self, x):
        return self._encode(self._tokens(x))

    def forward_head(self, x, pre_logits=False):
        return x[:, 0]

    def forward_masked(self, x, mask):
        patches = self._tokens(x)
        flat = mask.flatten(1)  # [B, N]
        ids_shuffle = torch.argsort(flat.int(), dim=1, stable=True)  # visible first
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        keep = int((~flat[0]).sum())
        index = ids_shuffle[:, :keep, None].expand(-1, -1, patches.shape[-1])
        tokens = self._encode(torch.gather(patches, 1, index))
        return {"tokens": tokens, "ids_restore": ids_restore, "mask": flat, "pyramid": [], "fused": tokens}


def grid_masks(batch: int, grid: int, ratio: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    n = grid * grid
    hidden = int(round(n * ratio))
    order = torch.rand(batch, n, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :hidden], True)
    return mask.view(batch, grid, grid)


@pytest.fixture
def tiny_backbone():
    torch.manual_seed(0)
    return TinyBackbone()


@pytest.fixture
def make_masks():
    return grid_masks
