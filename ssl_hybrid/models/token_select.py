"""EViT-style token selection: keep the patch tokens the class token attends to most, fuse the rest.

At a selection block, after attention, patch tokens are ranked by class-token attention (mean over
heads). The top ones are kept; the others are merged into one token, their attention-weighted mean
(EViT, Liang et al. 2022), so their content is summarized instead of lost. Two policies:

* fixed: keep ``ceil(keep_rate * M)`` of the M candidate tokens in every image (EViT);
* adaptive: per image, keep the fewest tokens whose attention covers ``keep_share`` of the class
  token's attention over candidates. Simple images concentrate attention and keep fewer tokens.
  Counts differ per image, so the batch is padded to the largest count and a ``valid`` mask
  excludes the padding from attention and pooling.

Candidates are every token except the class token (a fused token from an earlier selection is a
candidate too, as in EViT). Padding tokens are never kept and never fused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ssl_hybrid.models.attention import TokenLayout


@dataclass
class TokenSelectConfig:
    """``keep_rate`` < 1 enables fixed selection; ``keep_share`` (if set) enables adaptive selection."""

    keep_rate: float = 1.0
    keep_share: float | None = None
    # never keep fewer than this many patch tokens per image (adaptive can otherwise collapse to 1)
    min_keep: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_rate <= 1.0:
            raise ValueError(f"token_keep_rate must be in (0, 1], got {self.keep_rate}")
        if self.keep_share is not None and not 0.0 < self.keep_share <= 1.0:
            raise ValueError(f"token_keep_share must be in (0, 1], got {self.keep_share}")

    @property
    def enabled(self) -> bool:
        return self.keep_share is not None or self.keep_rate < 1.0

    @property
    def mode(self) -> str:
        return "adaptive" if self.keep_share is not None else ("fixed" if self.keep_rate < 1.0 else "none")


def tokens_to_keep(cls_attn: torch.Tensor, valid: torch.Tensor, config: TokenSelectConfig) -> torch.Tensor:
    """Number of candidate tokens to keep per image, ``[B]`` long.

    ``cls_attn [B, M]`` is class-token attention over the candidates, ``valid [B, M]`` their padding mask.
    """
    num_valid = valid.sum(dim=1)  # [B]
    if config.keep_share is None:
        keep = torch.full_like(num_valid, math.ceil(config.keep_rate * valid.shape[1]))
    else:
        share = cls_attn.masked_fill(~valid, 0.0)
        share = share / share.sum(dim=1, keepdim=True).clamp_min(1e-12)  # [B, M] sums to 1 per image
        cumulative = share.sort(dim=1, descending=True).values.cumsum(dim=1)
        # tokens needed = 1 + number of prefixes still below the target share
        keep = (cumulative < config.keep_share - 1e-6).sum(dim=1) + 1
    return torch.minimum(keep.clamp_min(config.min_keep), num_valid)


def select_tokens(
    x: torch.Tensor, cls_attn: torch.Tensor, layout: TokenLayout, config: TokenSelectConfig
) -> tuple[torch.Tensor, TokenLayout, torch.Tensor]:
    """Keep the most attended tokens and fuse the rest into one.

    Args: ``x [B, T, C]`` (class token first), ``cls_attn [B, T]``, the tokens' layout.
    Returns ``(x [B, 1+K(+1), C], new layout, kept [B])`` where K is the largest per-image count;
    ``kept`` counts the patch (candidate) tokens each image kept, excluding class and fused tokens.
    The fused token is dropped when no image has anything left to fuse.
    """
    B, T, C = x.shape
    candidates, scores = x[:, 1:], cls_attn[:, 1:]  # [B, M, C], [B, M]
    valid = layout.valid[:, 1:] if layout.valid is not None else torch.ones_like(scores, dtype=torch.bool)
    keep = tokens_to_keep(scores, valid, config)  # [B]
    max_keep = int(keep.max())

    order = scores.masked_fill(~valid, -1.0).argsort(dim=1, descending=True)  # [B, M] padding ranks last
    rank = order.argsort(dim=1)  # [B, M] rank of each candidate
    top = order[:, :max_keep]  # [B, K]
    kept_tokens = candidates.gather(1, top[..., None].expand(-1, -1, C))  # [B, K, C]
    kept_valid = torch.arange(max_keep, device=x.device)[None] < keep[:, None]  # [B, K]
    kept_pos = layout.pos[:, 1:].gather(1, top)

    fuse_weight = scores * ((rank >= keep[:, None]) & valid)  # [B, M] attention of the tokens dropped
    has_rest = fuse_weight.sum(dim=1) > 0  # [B]
    parts, valid_parts, pos_parts = (
        [x[:, :1], kept_tokens],
        [valid[:, :1] | True, kept_valid],
        [layout.pos[:, :1], kept_pos],
    )
    if bool(has_rest.any()):
        weights = fuse_weight / fuse_weight.sum(dim=1, keepdim=True).clamp_min(1e-12)
        fused = (weights[..., None] * candidates).sum(dim=1, keepdim=True)  # [B, 1, C]
        parts.append(fused)
        valid_parts.append(has_rest[:, None])
        pos_parts.append(layout.pos.new_full((B, 1), -1))
    new_valid = torch.cat(valid_parts, dim=1)
    new_layout = TokenLayout(
        grid=layout.grid,
        pos=torch.cat(pos_parts, dim=1),
        valid=None if bool(new_valid.all()) else new_valid,
        full_grid=False,
    )
    return torch.cat(parts, dim=1), new_layout, keep


def default_select_blocks(depth: int) -> tuple[int, ...]:
    """EViT's placement, scaled to depth: blocks 4, 7, 10 of 12 (0-based 3, 6, 9); never the first block (its
    attention has not looked at the image yet) unless it is the only one (resvit_nano: selection inside it)."""
    return tuple(sorted({min(max(1, int(depth * f)), depth - 1) for f in (3 / 12, 6 / 12, 9 / 12)}))
