"""Masked image modeling, ConvMAE-style.

The backbone's ``forward_masked`` hides 75% of the stride-16 grid, runs its transformer stages on the
visible tokens only and returns ``fused`` (multi-scale fused visible tokens, class token first). A light
transformer decoder appends mask tokens, restores the patch order, and predicts the pixels of every
patch; the loss is MAE's normalized-pixel MSE on the hidden patches only.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from lightly.models.utils import get_2d_sine_cosine_positional_embedding, patchify
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ssl_hybrid.models.contract import PATCH_SIZE


def pixel_targets(images: Tensor, patch_size: int, norm_pix: bool) -> Tensor:
    """[B, 3, H, W] -> [B, N, p*p*3] per-patch pixels (row-major grid), optionally normalized per patch."""
    target = patchify(images.float(), patch_size)  # [B, N, p*p*3]
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE's reference implementation
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


def masked_patch_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the hidden patches only. pred/target [B, N, D], mask [B, N] (True = hidden)."""
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # [B, N]
    weights = mask.float()
    return (per_patch * weights).sum() / weights.sum().clamp_min(1.0)


class MIMDecoder(nn.Module):
    """Light transformer decoder over visible tokens + mask tokens (MAE's decoder, ConvMAE-sized)."""

    pos_embed: Tensor  # a buffer (register_buffer below)

    def __init__(
        self,
        embed_dim: int,
        grid: tuple[int, int],
        decoder_dim: int,
        depth: int,
        num_heads: int | None = None,
        patch_size: int = PATCH_SIZE,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.grid = grid
        heads = num_heads or max(1, decoder_dim // 64)
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed 2-D sin-cos positions (MAE): they need no learning and carry the grid layout to mask tokens.
        self.register_buffer("pos_embed", self._sincos(decoder_dim, grid), persistent=False)
        # Any: timm types Block's norm_layer as a class, yet only calls it (its own ViT passes such a partial)
        norm_layer: Any = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *[Block(decoder_dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.pred = nn.Linear(decoder_dim, patch_size * patch_size * in_chans)
        trunc_normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _sincos(dim: int, grid: tuple[int, int]) -> Tensor:
        if grid[0] != grid[1]:
            raise ValueError(f"MIM decoder expects a square patch grid, got {grid}")
        table = get_2d_sine_cosine_positional_embedding(dim, grid[0], cls_token=True)
        return torch.from_numpy(table).float().unsqueeze(0)  # [1, 1+N, D]

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def restore_order(self, tokens: Tensor, ids_restore: Tensor) -> Tensor:
        """[B, 1+N_vis, D] visible tokens -> [B, 1+N, D] with mask tokens at the hidden positions."""
        batch, num_patches = ids_restore.shape
        visible = tokens[:, 1:]  # [B, N_vis, D]
        fill = self.mask_token.to(visible.dtype).expand(batch, num_patches - visible.shape[1], -1)
        patches = torch.cat([visible, fill], dim=1)  # [B, N, D] in shuffled order
        index = ids_restore.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        patches = torch.gather(patches, 1, index)  # [B, N, D] in grid order
        return torch.cat([tokens[:, :1], patches], dim=1)

    def forward(self, fused: Tensor, ids_restore: Tensor) -> Tensor:
        """fused [B, 1+N_vis, C] -> pixel predictions [B, N, p*p*3] for every patch."""
        x = self.restore_order(self.embed(fused), ids_restore)  # [B, 1+N, D]
        x = self.blocks(x + self.pos_embed.to(x.dtype))
        return self.pred(self.norm(x))[:, 1:]  # [B, N, p*p*3], class token dropped


class MIMObjective(nn.Module):
    """Decoder + normalized-pixel loss on hidden patches. ``forward`` returns ``{"mim": loss}``."""

    def __init__(
        self,
        embed_dim: int,
        image_size: int,
        decoder_dim: int,
        decoder_depth: int,
        norm_pix: bool,
        patch_size: int = PATCH_SIZE,
    ) -> None:
        super().__init__()
        grid = (image_size // patch_size, image_size // patch_size)
        self.patch_size = patch_size
        self.norm_pix = norm_pix
        self.decoder = MIMDecoder(embed_dim, grid, decoder_dim, decoder_depth, patch_size=patch_size)

    def forward(self, student_out: dict, images: Tensor) -> dict[str, Tensor]:
        """student_out: the backbone's forward_masked dict for ``images`` [B, 3, H, W]."""
        pred = self.decoder(student_out["fused"], student_out["ids_restore"])  # [B, N, p*p*3]
        target = pixel_targets(images, self.patch_size, self.norm_pix)
        return {"mim": masked_patch_loss(pred, target, student_out["mask"])}


__all__ = ["MIMDecoder", "MIMObjective", "masked_patch_loss", "pixel_targets"]
