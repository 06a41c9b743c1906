"""Multi-head self-attention with global, windowed and top-k sparsity over a (possibly partial) token set.

Tokens are ``[B, T, C]`` with the class token first. A :class:`TokenLayout` tells attention where
each token sits on the stride-16 grid (``pos``, -1 for global tokens: the class token and the token
that fuses dropped tokens) and which tokens are padding (``valid``, from adaptive token selection).
Positions matter for window attention, which must work on the visible tokens of a masked image too.

* ``global``: every token attends to every valid token (``F.scaled_dot_product_attention``).
* ``window``: patch tokens attend within ``window_size x window_size`` grid windows; global tokens
  attend and are attended everywhere (Swin-like locality, class token stays global). With the full
  grid, windows are computed as a batch of small attentions (the real saving); on a partial grid
  (masked or selected tokens) a boolean attention mask gives the same pattern.
* ``topk``: each query attends to its ``topk`` highest-scoring keys (KVT-style sparsification). It
  computes all scores first, so it changes what attention sees, not its cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch import nn

from ssl_hybrid.config import ATTN_MODES  # the choices of model.attn_mode, defined once in the torch-free config


@dataclass
class TokenLayout:
    """Where tokens are: ``pos [B, T]`` grid index (-1 = global token), ``valid [B, T]`` or None (all valid)."""

    grid: tuple[int, int]
    pos: torch.Tensor
    valid: torch.Tensor | None = None
    # True while tokens are [cls] + every grid cell in raster order (enables the fast window path)
    full_grid: bool = False

    @classmethod
    def for_grid(cls, batch_size: int, grid: tuple[int, int], device: torch.device) -> TokenLayout:
        cells = torch.arange(grid[0] * grid[1], device=device)
        pos = torch.cat([cells.new_full((1,), -1), cells]).expand(batch_size, -1)  # [B, 1+N]
        return cls(grid=grid, pos=pos, valid=None, full_grid=True)

    @classmethod
    def for_visible(cls, ids_keep: torch.Tensor, grid: tuple[int, int]) -> TokenLayout:
        pos = torch.cat([ids_keep.new_full((ids_keep.shape[0], 1), -1), ids_keep], dim=1)  # [B, 1+Nv]
        return cls(grid=grid, pos=pos, valid=None, full_grid=False)


def window_allowed(layout: TokenLayout, window_size: int) -> torch.Tensor:
    """Bool ``[B, T, T]``: may query i attend to key j under window attention (global tokens see all)."""
    pos = layout.pos
    is_global = pos < 0  # [B, T]
    width = layout.grid[1]
    row, col = pos.clamp_min(0) // width, pos.clamp_min(0) % width
    window_id = (row // window_size) * 10_000 + (col // window_size)  # unique per window
    same = window_id[:, :, None] == window_id[:, None, :]  # [B, T, T]
    return same | is_global[:, :, None] | is_global[:, None, :]


def attention_allowed(layout: TokenLayout, mode: str, window_size: int) -> torch.Tensor | None:
    """Bool ``[B, 1, T, T]`` mask (True = may attend) or None when everything may attend everything."""
    allowed = window_allowed(layout, window_size) if mode == "window" else None
    if layout.valid is not None:
        key_ok = layout.valid[:, None, :]  # [B, 1, T] padding tokens are never attended
        allowed = key_ok.expand(-1, layout.pos.shape[1], -1) if allowed is None else allowed & key_ok
    return None if allowed is None else allowed[:, None]


class Attention(nn.Module):
    """timm-ViT-compatible attention (``qkv``/``proj`` names) with the sparsity modes above.
    ``attn_mode``, ``window_size`` and ``topk`` have no defaults here: the model (``HybridViT``) owns them."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        attn_mode: str,
        window_size: int,
        topk: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"attn_mode must be one of {ATTN_MODES}, got {attn_mode!r}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_mode = attn_mode
        self.window_size = window_size
        self.topk = topk
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, layout: TokenLayout, need_cls_attn: bool = False, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(out [B, T, C], cls_attn [B, T] or None)``; cls_attn = class-token attention, head-mean.

        ``allowed`` is the precomputed :func:`attention_allowed` mask for this layout (shared by blocks).
        """
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, h, T, d] each
        dropout = self.attn_drop if self.training else 0.0
        if self.attn_mode == "topk":
            out = self._topk_attention(q, k, v, allowed)
        elif self.attn_mode == "window" and layout.full_grid and layout.valid is None:
            out = window_attention_full_grid(q, k, v, layout.grid, self.window_size, allowed, dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, C)))
        cls_attn = self._class_token_attention(q, k, allowed) if need_cls_attn else None
        return out, cls_attn

    def _class_token_attention(self, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        # one query row is cheap to recompute explicitly; the fused SDPA kernel does not return weights
        scores = (q[:, :, :1] @ k.transpose(-2, -1)) * self.scale  # [B, h, 1, T]
        if allowed is not None:
            scores = scores.masked_fill(~allowed[:, :, :1], float("-inf"))
        return scores.softmax(dim=-1).mean(dim=1)[:, 0]  # [B, T]

    def _topk_attention(self, q, k, v, allowed: torch.Tensor | None) -> torch.Tensor:
        scores = (q @ k.transpose(-2, -1)) * self.scale  # [B, h, T, T]
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        scores = scores.masked_fill(scores < kth_largest(scores, self.topk), float("-inf"))
        attn = scores.softmax(dim=-1)
        if self.training and self.attn_drop > 0:
            attn = F.dropout(attn, self.attn_drop)
        return attn @ v


@torch.fx.wrap
@register_notrace_function  # reason: k is capped by the number of keys, which FX sees as a Proxy
def kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[..., 1]``: each row's k-th largest score (its largest when a row has fewer than k)."""
    return scores.topk(min(k, scores.shape[-1]), dim=-1).values[..., -1:]


@torch.fx.wrap
@register_notrace_function  # reason: the fast path depends on the grid (input size) dividing into windows
def window_attention_full_grid(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int],
    window_size: int,
    allowed: torch.Tensor,
    dropout: float,
) -> torch.Tensor:
    """Window attention over ``[cls] + every grid cell``: windows as a batch of small attentions (each
    also seeing the class token) when the grid divides into windows, else SDPA with the ``allowed`` mask."""
    B, h, T, d = q.shape
    gh, gw, ws = grid[0], grid[1], window_size
    if gh % ws or gw % ws:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)

    def windows(t: torch.Tensor) -> torch.Tensor:  # [B, h, N, d] -> [B, h, nW, ws*ws, d]
        t = t.reshape(B, h, gh // ws, ws, gw // ws, ws, d).permute(0, 1, 2, 4, 3, 5, 6)
        return t.reshape(B, h, -1, ws * ws, d)

    q_win, k_win, v_win = windows(q[:, :, 1:]), windows(k[:, :, 1:]), windows(v[:, :, 1:])
    num_windows = q_win.shape[2]
    k_cls = k[:, :, :1, None].expand(-1, -1, num_windows, -1, -1)  # [B, h, nW, 1, d]
    v_cls = v[:, :, :1, None].expand(-1, -1, num_windows, -1, -1)
    out_win = F.scaled_dot_product_attention(
        q_win, torch.cat([k_cls, k_win], dim=3), torch.cat([v_cls, v_win], dim=3), dropout_p=dropout
    )
    out_win = out_win.reshape(B, h, gh // ws, gw // ws, ws, ws, d).permute(0, 1, 2, 4, 3, 5, 6)
    out_patches = out_win.reshape(B, h, gh * gw, d)
    out_cls = F.scaled_dot_product_attention(q[:, :, :1], k, v, dropout_p=dropout)  # class token stays global
    return torch.cat([out_cls, out_patches], dim=2)  # [B, h, T, d]
