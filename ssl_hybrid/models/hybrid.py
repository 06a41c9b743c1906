"""Hybrid CNN->Transformer backbone (ConvMAE-style), registered with timm as ``hybrid_*``.

Layout (strides relative to the image):

    stem      4x4/4 conv + LN                          -> stride 4,  conv_dims[0] channels
    stage1    ConvNeXt blocks (7x7 depthwise + MLP)     -> stride 4   (local detail: edges, texture)
    down8     LN + 2x2/2 conv                           -> stride 8,  conv_dims[1]
    stage2    ConvNeXt blocks                           -> stride 8
    patch     LN + 2x2/2 patch projection               -> stride 16, embed_dim tokens (+ class token)
    blocks    ViT blocks on the stride-16 tokens       (global relations; optional window/top-k
                                                         attention and EViT token selection)
    fusion    stride-4 / stride-8 maps projected to stride 16 and added to the patch tokens
              before the final norm (ConvMAE's multi-scale decoder input; also what pooling sees)

Masked forward (MIM): hidden 16-px patches are zeroed after the stem and after every conv block
(masked convolution, SparK / ConvNeXt V2 / ConvMAE) so visible outputs never depend on hidden
pixels; the conv MLPs, the patch projection, the fusion and the transformer run on visible
positions only, which is where the masked speed-up comes from.

The conv stages keep tensors channels-last ``[B, H, W, C]`` so LayerNorm/MLP act on the last dim
and visible positions can be gathered as rows; depthwise convs see a channels-last NCHW view.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerScale, Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssl_hybrid.models.attention import ATTN_MODES, Attention, TokenLayout, attention_allowed
from ssl_hybrid.models.contract import (
    EVAL_CROP_PCT,
    PATCH_SIZE,
    TokenBackboneMixin,
    check_global_pool,
    multiscale_pool,
    token_grid,
)
from ssl_hybrid.models.masking import check_mask, upsample_mask, visible_indices
from ssl_hybrid.models.token_select import TokenSelectConfig, default_select_blocks, select_tokens

log = logging.getLogger(__name__)


def patchify_nhwc(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B, (H/p)*(W/p), p*p*C]`` rows of non-overlapping p x p cells (raster order)."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // patch, patch, W // patch, patch, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, N, C]``, ``index [B, M]`` -> ``[B, M, C]``."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class ConvBlock(nn.Module):
    """ConvNeXt block (7x7 depthwise conv -> LN -> MLP -> layer scale) on ``[B, H, W, C]``.

    With ``visible`` (flat indices ``[B, M]``) the LN/MLP run only on those positions and every
    other position of the output is zero: masked convolution without computing the hidden 75%.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = 1e-6,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU)
        self.ls = LayerScale(dim, ls_init_value) if ls_init_value else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        B, H, W, C = x.shape
        mixed = self.conv_dw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, H * W, C)  # [B, HW, C]
        shortcut = x.reshape(B, H * W, C)
        if visible is None:
            out = shortcut + self.drop_path(self.ls(self.mlp(self.norm(mixed))))
        else:
            out_visible = gather_rows(shortcut, visible) + self.drop_path(
                self.ls(self.mlp(self.norm(gather_rows(mixed, visible))))
            )  # [B, M, C]
            out = shortcut.new_zeros(B, H * W, C).scatter(1, visible[..., None].expand(-1, -1, C), out_visible)
        return out.reshape(B, H, W, C)


class Downsample(nn.Module):
    """LN + non-overlapping 2x2/2 conv on ``[B, H, W, C]`` (each output cell sees one 2x2 block only)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # [B, H/2, W/2, C']


class Block(nn.Module):
    """Pre-norm ViT block; optionally selects tokens between attention and MLP (as EViT does)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        *,
        attn_mode: str,
        window_size: int,
        attn_topk: int,
        ls_init_value: float | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            attn_mode=attn_mode,
            window_size=window_size,
            topk=attn_topk,
            attn_drop=attn_drop,
            proj_drop=drop,
        )
        self.ls1 = LayerScale(dim, ls_init_value) if ls_init_value else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.ls2 = LayerScale(dim, ls_init_value) if ls_init_value else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        layout: TokenLayout,
        allowed: torch.Tensor | None = None,
        select: TokenSelectConfig | None = None,
    ):
        """Return ``(x, layout, kept)``; ``kept [B]`` is None unless ``select`` is given."""
        attn_out, cls_attn = self.attn(self.norm1(x), layout, need_cls_attn=select is not None, allowed=allowed)
        x = x + self.drop_path1(self.ls1(attn_out))
        kept = None
        if select is not None:
            x, layout, kept = select_tokens(x, cls_attn, layout, select)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, layout, kept


class HybridViT(TokenBackboneMixin, nn.Module):
    """Conv stages at strides 4/8, ViT at stride 16, multi-scale fusion. See the module docstring."""

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token_avg",
        conv_dims: Sequence[int] = (48, 96),
        conv_depths: Sequence[int] = (1, 1),
        conv_kernel_size: int = 7,
        conv_mlp_ratio: float = 4.0,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_mode: str = "global",
        window_size: int = 7,
        attn_topk: int = 49,
        token_keep_rate: float = 1.0,
        token_keep_share: float | None = None,
        token_select_blocks: Sequence[int] | None = None,
        token_min_keep: int = 1,
    ):
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] % PATCH_SIZE or img_size[1] % PATCH_SIZE:
            raise ValueError(f"img_size {img_size} must be a multiple of {PATCH_SIZE}")
        check_global_pool(global_pool)
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"attn_mode must be one of {ATTN_MODES}, got {attn_mode!r}")
        c4, c8 = conv_dims
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = PATCH_SIZE
        self.img_size = img_size
        self.patch_grid = (img_size[0] // PATCH_SIZE, img_size[1] // PATCH_SIZE)
        self.num_prefix_tokens = 1
        self.num_multiscale_features = c4 + c8 + 2 * embed_dim  # forward_multiscale's width
        self.attn_mode = attn_mode
        self.window_size = window_size
        self.grad_checkpointing = False
        self.depth = depth
        self.token_select_blocks = default_select_blocks(depth)
        self.set_token_selection(token_keep_rate, token_keep_share, token_select_blocks, token_min_keep)
        # reported after each forward_features: patch tokens kept per image [B], and the padding mask
        self.last_tokens_kept: torch.Tensor | None = None
        self.last_token_mask: torch.Tensor | None = None

        num_blocks = sum(conv_depths) + depth
        rates = torch.linspace(0, drop_path_rate, num_blocks, device="cpu").tolist()  # stochastic depth decay rule
        self.stem_conv = nn.Conv2d(in_chans, c4, kernel_size=4, stride=4)
        self.stem_norm = nn.LayerNorm(c4, eps=1e-6)
        self.stage1 = nn.ModuleList(
            [ConvBlock(c4, conv_kernel_size, conv_mlp_ratio, drop_path=rates.pop(0)) for _ in range(conv_depths[0])]
        )
        self.down8 = Downsample(c4, c8)
        self.stage2 = nn.ModuleList(
            [ConvBlock(c8, conv_kernel_size, conv_mlp_ratio, drop_path=rates.pop(0)) for _ in range(conv_depths[1])]
        )
        # stride 8 -> 16 as a linear map of 2x2 cells, so it can run on visible patches only
        self.patch_norm = nn.LayerNorm(c8, eps=1e-6)
        self.patch_embed = nn.Linear(4 * c8, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_grid[0] * self.patch_grid[1], embed_dim))
        self.blocks = nn.ModuleList(
            [
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates.pop(0),
                    attn_mode=attn_mode,
                    window_size=window_size,
                    attn_topk=attn_topk,
                )
                for _ in range(depth)
            ]
        )
        # ConvMAE's multi-scale fusion: 4x4 stride-4 cells and 2x2 stride-8 cells -> one stride-16 token
        self.fuse4 = nn.Linear(16 * c4, embed_dim)
        self.fuse8 = nn.Linear(4 * c8, embed_dim)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

        self.feature_info = [
            dict(num_chs=c4, reduction=4, module="stage1"),
            dict(num_chs=c8, reduction=8, module="stage2"),
        ]
        self.feature_info += [dict(num_chs=embed_dim, reduction=16, module=f"blocks.{i}") for i in range(depth)]
        self._init_weights()

    # ---------------------------------------------------------------- init and timm contract
    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise lr decay: conv stages and embeddings first, then each block."""
        return dict(
            stem=r"^cls_token|^pos_embed|^stem|^stage1|^down8|^stage2|^patch_",
            blocks=r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^fuse|^norm", (99999,))],
        )

    # ---------------------------------------------------------------- runtime switches (same weights)
    def set_attention(self, attn_mode: str, window_size: int | None = None, topk: int | None = None) -> None:
        """Switch every block's attention pattern; weights are unchanged (compare modes on one model)."""
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"attn_mode must be one of {ATTN_MODES}, got {attn_mode!r}")
        self.attn_mode = attn_mode
        self.window_size = window_size or self.window_size
        for block in self.blocks:
            attn = cast(Attention, block.attn)  # a ModuleList's items type as nn.Module
            attn.attn_mode = attn_mode
            attn.window_size = self.window_size
            attn.topk = topk or attn.topk

    def set_token_selection(
        self,
        keep_rate: float = 1.0,
        keep_share: float | None = None,
        blocks: Sequence[int] | None = None,
        min_keep: int = 1,
    ) -> None:
        """Turn token selection on/off for forward_features (keep_rate=1, keep_share=None = off)."""
        self.token_select = TokenSelectConfig(keep_rate, keep_share, min_keep)
        if blocks is not None:
            if any(not 0 <= i < self.depth for i in blocks):
                raise ValueError(f"token_select_blocks {tuple(blocks)} out of range for depth {self.depth}")
            self.token_select_blocks = tuple(blocks)

    # ---------------------------------------------------------------- stages
    def _run(self, module: nn.Module, *args):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward_conv(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``[B, 3, H, W]`` -> (stride-4 ``[B, H/4, W/4, C4]``, stride-8 ``[B, H/8, W/8, C8]``), channels-last.

        With ``mask [B, H/16, W/16]`` (True = hidden), hidden positions are zero after the stem,
        after every block and after the downsampling, so nothing from hidden pixels propagates.
        """
        visible4 = visible8 = keep4 = keep8 = None
        if mask is not None:
            hidden4, hidden8 = upsample_mask(mask, 4), upsample_mask(mask, 2)  # [B, H/4, W/4], [B, H/8, W/8]
            keep4, keep8 = (~hidden4)[..., None].to(x.dtype), (~hidden8)[..., None].to(x.dtype)  # [B, h, w, 1]
            visible4, _ = visible_indices(hidden4.flatten(1))
            visible8, _ = visible_indices(hidden8.flatten(1))
        x = self.stem_norm(self.stem_conv(x).permute(0, 2, 3, 1))  # [B, H/4, W/4, C4]
        if keep4 is not None:
            x = x * keep4
        for block in self.stage1:
            x = self._run(block, x, visible4)
        s4 = x
        x = self.down8(x)  # [B, H/8, W/8, C8]
        if keep8 is not None:
            x = x * keep8
        for block in self.stage2:
            x = self._run(block, x, visible8)
        return s4, x

    def fusion_tokens(self, s4: torch.Tensor, s8: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Stride-4/8 maps projected to the stride-16 tokens at grid positions ``pos [B, M]`` -> ``[B, M, D]``.

        Positions -1 (the token fusing dropped tokens) get zeros: they have no single location.
        """
        index = pos.clamp_min(0)
        fused = self.fuse4(gather_rows(patchify_nhwc(s4, 4), index)) + self.fuse8(
            gather_rows(patchify_nhwc(s8, 2), index)
        )  # [B, M, D]
        return fused * (pos >= 0)[..., None].to(fused.dtype)

    def _patch_tokens(self, s8: torch.Tensor, grid: tuple[int, int], ids_keep: torch.Tensor | None) -> torch.Tensor:
        """Stride-8 map -> ``[B, 1+N(visible), D]`` tokens with position embedding and class token first."""
        B = s8.shape[0]
        cells = patchify_nhwc(self.patch_norm(s8), 2)  # [B, N, 4*C8]
        pos_embed = self._pos_embed_for(grid).expand(B, -1, -1)  # [B, N, D]
        if ids_keep is not None:
            cells, pos_embed = gather_rows(cells, ids_keep), gather_rows(pos_embed, ids_keep)
        tokens = self.patch_embed(cells) + pos_embed  # [B, Nv, D]
        return torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)

    def forward_blocks(self, x: torch.Tensor, layout: TokenLayout, select: bool = False):
        """Run the transformer blocks; returns ``(x, layout, kept)`` with kept ``[B]`` or None (no selection)."""
        allowed = attention_allowed(layout, self.attn_mode, self.window_size)
        kept = None
        for index, block in enumerate(self.blocks):
            select_here = self.token_select if select and index in self.token_select_blocks else None
            x, new_layout, block_kept = self._run(block, x, layout, allowed, select_here)
            if new_layout is not layout:  # tokens changed: rebuild the attention pattern once
                layout = new_layout
                allowed = attention_allowed(layout, self.attn_mode, self.window_size)
            kept = block_kept if block_kept is not None else kept
        return x, layout, kept

    def _encode(self, x: torch.Tensor, mask: torch.Tensor | None, select: bool):
        """Shared body of forward_features / forward_masked; returns pre-norm tokens, fusion, layout, maps."""
        B = x.shape[0]
        grid = token_grid(x)
        ids_keep = None
        if mask is not None:
            check_mask(mask, B, *grid)
            ids_keep, _ = visible_indices(mask.flatten(1))
        s4, s8 = self.forward_conv(x, mask)
        tokens = self._patch_tokens(s8, grid, ids_keep)
        layout = (
            TokenLayout.for_grid(B, grid, x.device) if ids_keep is None else TokenLayout.for_visible(ids_keep, grid)
        )
        tokens, layout, kept = self.forward_blocks(tokens, layout, select=select)
        fusion = self.fusion_tokens(s4, s8, layout.pos[:, 1:])  # [B, T-1, D]
        return tokens, fusion, layout, kept, (s4, s8)

    @staticmethod
    def _add_fusion(tokens: torch.Tensor, fusion: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens[:, :1], tokens[:, 1:] + fusion], dim=1)

    # ---------------------------------------------------------------- public forwards
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, 3, H, W]`` -> normed tokens ``[B, 1+N, C]`` (class token first, multi-scale fused).

        With token selection on, N is the largest per-image count kept plus the fused token;
        ``last_token_mask [B, 1+N]`` marks padding (zeroed in the output) and ``last_tokens_kept [B]``
        the patch tokens each image kept. Without selection N = H*W/256 and the mask is None.
        """
        select = self.token_select.enabled and self.global_pool != "multiscale"  # multiscale: every position
        tracing = isinstance(x, torch.fx.Proxy)
        if select and tracing:
            raise torch.fx.proxy.TraceError(
                "token selection keeps a data-dependent number of tokens, which FX cannot trace; trace the "
                "model with model.set_token_selection(1.0) (same weights), then switch it back on"
            )
        tokens, fusion, layout, kept, stages = self._encode(x, None, select)
        self._keep_stage_means(list(stages), channels_last=True)
        out = self.norm(self._add_fusion(tokens, fusion))
        if layout.valid is not None:
            out = out * layout.valid[..., None].to(out.dtype)
        if tracing:  # a graph has no side channel: keep the last eager statistics, not Proxies
            return out
        self.last_token_mask = layout.valid
        self.last_tokens_kept = (
            kept
            if kept is not None
            else torch.full((x.shape[0],), layout.pos.shape[1] - 1, dtype=torch.long, device=x.device)
        )
        return out

    def pool(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, 1+N, C]`` -> ``[B, C]``: class token, mean of patch tokens, or (default) their average."""
        if self.global_pool == "":
            return x
        if self.global_pool == "token":
            return x[:, 0]
        patches = x[:, 1:]
        if token_mask is None:
            mean = patches.mean(dim=1)
        else:
            weight = token_mask[:, 1:, None].to(x.dtype)
            mean = (patches * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)
        return mean if self.global_pool == "avg" else 0.5 * (x[:, 0] + mean)

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pooled ``[B, C]`` (pre_logits) or logits. Padding from token selection is excluded using
        ``token_mask`` or, when not given, the mask of the last forward_features if shapes match."""
        if self.global_pool == "multiscale":
            x = self.head_drop(self._multiscale_head_input(x))
            return x if pre_logits else self.head(x)
        if token_mask is None and self.last_token_mask is not None and self.last_token_mask.shape == x.shape[:2]:
            token_mask = self.last_token_mask
        x = self.head_drop(self.pool(x, token_mask))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "multiscale":  # one pass, no side channel (traceable)
            return self.head(self.head_drop(self.forward_multiscale(x)))
        return self.forward_head(self.forward_features(x))

    def forward_multiscale(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-scale pooled embedding ``[B, C4 + C8 + 2D]``: GAP of the stride-4/8 maps, class token and
        patch mean, each L2-normalized, concatenated (no token selection: every position counts)."""
        tokens, fusion, _, _, (s4, s8) = self._encode(x, None, select=False)
        out = self.norm(self._add_fusion(tokens, fusion))  # [B, 1+N, D]
        return multiscale_pool([s4.mean(dim=(1, 2)), s8.mean(dim=(1, 2))], out)

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        """Masked-image-modeling encoder pass; ``mask [B, H/16, W/16]`` bool, True = hidden.

        Every image must hide the same number of patches (ValueError otherwise). Returns
        ``tokens [B, 1+Nv, C]`` (normed encoder output, class token first, visible patches in
        ascending position), ``fused [B, 1+Nv, C]`` (encoder output + stride-4/8 features projected
        to stride 16, normed: the MIM decoder input), ``ids_keep [B, Nv]``, ``ids_restore [B, N]``
        (MAE convention), ``mask [B, N]`` (True = hidden), ``pyramid`` = [stride-4 ``[B, C4, H/4, W/4]``,
        stride-8 ``[B, C8, H/8, W/8]``] with hidden positions zero, and ``grid``.
        Token selection never runs here: the decoder needs every visible token.
        """
        tokens, fusion, layout, _, (s4, s8) = self._encode(x, mask, select=False)
        self.last_token_mask = None  # no padding here; a stale mask must not reach forward_head(fused)
        mask_flat = mask.flatten(1)
        ids_keep, ids_restore = visible_indices(mask_flat)
        return dict(
            tokens=self.norm(tokens),
            fused=self.norm(self._add_fusion(tokens, fusion)),
            ids_keep=ids_keep,
            ids_restore=ids_restore,
            mask=mask_flat,
            pyramid=[s4.permute(0, 3, 1, 2), s8.permute(0, 3, 1, 2)],
            grid=layout.grid,
        )

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's intermediate-feature API over ``feature_info``: [stride-4, stride-8, block 0..depth-1].

        Block outputs are the patch tokens reshaped to ``[B, C, H/16, W/16]`` (NCHW) or ``[B, N, C]``
        (NLC); ``norm`` applies the final norm to them. No token selection (maps must be full grids).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        B = x.shape[0]
        grid = token_grid(x)
        s4, s8 = self.forward_conv(x)
        maps = {0: s4, 1: s8}
        intermediates = [self._format_map(maps[i], output_fmt) for i in take_indices if i < 2]
        tokens = self._patch_tokens(s8, grid, None)
        layout = TokenLayout.for_grid(B, grid, x.device)
        allowed = attention_allowed(layout, self.attn_mode, self.window_size)
        blocks = self.blocks[: max(max_index - 1, 0)] if stop_early else self.blocks
        for index, block in enumerate(blocks):
            tokens, _, _ = self._run(block, tokens, layout, allowed, None)
            if index + 2 in take_indices:
                out = self.norm(tokens) if norm else tokens
                out = out[:, 1:]
                if output_fmt == "NCHW":
                    out = out.reshape(B, grid[0], grid[1], -1).permute(0, 3, 1, 2)
                intermediates.append(out)
        if intermediates_only:
            return intermediates
        final = self.norm(self._add_fusion(tokens, self.fusion_tokens(s4, s8, layout.pos[:, 1:])))
        return final, intermediates

    @staticmethod
    def _format_map(x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        return x.permute(0, 3, 1, 2) if output_fmt == "NCHW" else x.flatten(1, 2)


# -------------------------------------------------------------------- timm registration


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: HybridViT) -> dict[str, torch.Tensor]:
    """Adapt a saved state dict to ``model``: resample the position embedding to the model's grid."""
    state_dict = dict(state_dict)
    pos = state_dict.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is not None and target is not None and pos.shape != target.shape:
        old = int(math.isqrt(pos.shape[1]))
        old_grid = [old, old] if old * old == pos.shape[1] else None
        if old_grid is None:
            raise ValueError(f"cannot resample non-square pos_embed of {pos.shape[1]} positions")
        state_dict["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(model.patch_grid), old_size=old_grid, num_prefix_tokens=0
        )
    return state_dict


def _cfg(**kwargs) -> dict[str, Any]:
    return dict(
        url="",
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=None,
        crop_pct=EVAL_CROP_PCT,
        interpolation="bicubic",
        fixed_input_size=False,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="stem_conv",
        classifier="head",
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "hybrid_nano": _cfg(),
        "hybrid_tiny": _cfg(),
        "hybrid_small": _cfg(),
        "hybrid_base": _cfg(),
    }
)

# timm/builder plumbing that is not a model argument (kept out of the exported factory kwargs)
_BUILDER_KWARGS = {
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "cache_dir",
    "features_only",
    "out_indices",
    "feature_cls",
    "feature_cfg",
    "pretrained_strict",
    "checkpoint_path",
    "pretrained_model_args",
}


def _create_hybrid(variant: str, pretrained: bool, model_args: dict[str, Any], **kwargs) -> HybridViT:
    factory_kwargs = {k: v for k, v in kwargs.items() if k not in _BUILDER_KWARGS}
    model = build_model_with_cfg(
        HybridViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, -1)),
        **dict(model_args, **kwargs),
    )
    model.model_name = variant
    model.factory_kwargs = factory_kwargs  # what export writes next to the weights
    return model


@register_model
def hybrid_nano(pretrained: bool = False, **kwargs) -> HybridViT:
    """~0.6 M params: for fast tests and smoke runs."""
    args = dict(conv_dims=(16, 32), conv_depths=(1, 1), embed_dim=96, depth=4, num_heads=3)
    return _create_hybrid("hybrid_nano", pretrained, args, **kwargs)


@register_model
def hybrid_tiny(pretrained: bool = False, **kwargs) -> HybridViT:
    """~6 M params: ViT-Ti width with light conv stages."""
    args = dict(conv_dims=(32, 64), conv_depths=(1, 1), embed_dim=192, depth=12, num_heads=3)
    return _create_hybrid("hybrid_tiny", pretrained, args, **kwargs)


@register_model
def hybrid_small(pretrained: bool = False, **kwargs) -> HybridViT:
    """~22 M params, about ViT-S/16 FLOPs (one block fewer pays for the conv stages)."""
    args = dict(conv_dims=(48, 96), conv_depths=(1, 1), embed_dim=384, depth=11, num_heads=6)
    return _create_hybrid("hybrid_small", pretrained, args, **kwargs)


@register_model
def hybrid_base(pretrained: bool = False, **kwargs) -> HybridViT:
    """~85 M params, ViT-B width."""
    args = dict(conv_dims=(96, 192), conv_depths=(1, 1), embed_dim=768, depth=12, num_heads=12)
    return _create_hybrid("hybrid_base", pretrained, args, **kwargs)
