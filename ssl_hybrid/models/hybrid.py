"""The hybrid CNN->Transformer family (ConvMAE-style): one class, registered with timm as ``resvit_*`` and ``hybrid_*``.

Layout (strides relative to the image):

    conv stages  ``conv_stages="resnet"`` (batch-normed ResNet basic blocks) or ``"convnext"`` (ConvNeXt blocks),
                 2 or 3 stages at strides 4, 8(, 16); see models/conv_stages.py   (local detail: edges, texture)
    tokens       3 stages: 1x1 projection of the stride-16 map; 2 stages: LN + 2x2/2 patch projection of the
                 stride-8 map; + position embedding + class token
    blocks       ViT blocks on the stride-16 tokens (global relations; global / window / top-k attention,
                 EViT token selection with a fixed keep rate or an adaptive per-image share)
    fusion       stride-4 / stride-8 maps projected to stride 16 and added to the patch tokens before the
                 final norm (ConvMAE's multi-scale fusion; also what pooling sees)

Presets (the weights layout of each is what the two former classes saved, so old exports load unchanged):
``resvit_*`` = ResNet-18/34-like stem + 3 stages, then a few ViT blocks (the default model: batch-normed residual
conv stages start good and learn fast at small budgets); ``hybrid_*`` = 2 light ConvNeXt stages, then a deep ViT.

Everything after the conv stages is shared, so every efficiency feature works for every preset: masked forward
(MIM: hidden 16-px patches are zeroed through the conv stages, SparK-style, and only visible tokens enter the
transformer), token selection, adaptive compute and sparse attention. A combination that cannot work is a
one-line :class:`ModelOptionError`, never silently ignored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerScale, Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from ssl_hybrid.errors import UserError
from ssl_hybrid.models.attention import ATTN_MODES, Attention, TokenLayout, attention_allowed
from ssl_hybrid.models.contract import (
    EVAL_CROP_PCT,
    PATCH_SIZE,
    TokenBackboneMixin,
    check_global_pool,
    multiscale_pool,
    token_grid,
)
from ssl_hybrid.models.conv_stages import (  # noqa: F401  (ConvBlock, Downsample: their former home, still imported)
    CONV_STAGES,
    ConvBlock,
    Downsample,
    gather_rows,
    nchw,
    nhwc,
    patchify_nhwc,
)
from ssl_hybrid.models.masking import check_mask, visible_indices
from ssl_hybrid.models.token_select import TokenSelectConfig, default_select_blocks, select_tokens

log = logging.getLogger(__name__)


class ModelOptionError(UserError, ValueError):
    """A model option, or a combination of options, that the hybrid family cannot honour (one line)."""


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
    """Conv stages (``conv_stages``) at strides 4/8(/16), ViT at stride 16, multi-scale fusion. See the module
    docstring; ``conv_dims``/``conv_depths`` default to the kind's preset (``resvit_tiny``/``hybrid_small``)."""

    default_conv_stages = "convnext"

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token_avg",
        conv_stages: str | None = None,
        conv_dims: Sequence[int] | None = None,
        conv_depths: Sequence[int] | None = None,
        stem_dim: int = 64,
        conv_kernel_size: int = 7,
        conv_mlp_ratio: float = 4.0,
        fuse_stages: bool = True,
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
        kind = conv_stages or self.default_conv_stages
        conv_dims, conv_depths = _conv_defaults(kind, conv_dims, conv_depths)
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        check_options(img_size, kind, conv_dims, conv_depths, attn_mode, window_size, attn_topk, depth)
        check_global_pool(global_pool)
        self.conv = CONV_STAGES[kind]
        self.conv_stages = kind
        self.conv_dims = tuple(conv_dims)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = PATCH_SIZE
        self.img_size = img_size
        self.patch_grid = (img_size[0] // PATCH_SIZE, img_size[1] // PATCH_SIZE)
        self.num_prefix_tokens = 1
        self.num_multiscale_features = sum(conv_dims) + 2 * embed_dim  # forward_multiscale's width
        self.attn_mode = attn_mode
        self.window_size = window_size
        self.grad_checkpointing = False
        self.fuse_stages = fuse_stages
        self.depth = depth
        self.token_select_blocks = default_select_blocks(depth)
        self.set_token_selection(token_keep_rate, token_keep_share, token_select_blocks, token_min_keep)
        # reported after each forward_features: patch tokens kept per image [B], and the padding mask
        self.last_tokens_kept: torch.Tensor | None = None
        self.last_token_mask: torch.Tensor | None = None

        # stochastic depth decay rule; ConvNeXt blocks take the first rates, ResNet blocks have none (timm's)
        conv_blocks = sum(conv_depths) if kind == "convnext" else 0
        rates = torch.linspace(0, drop_path_rate, conv_blocks + depth, device="cpu").tolist()
        self.conv.build(
            self, in_chans, stem_dim, conv_dims, conv_depths, conv_kernel_size, conv_mlp_ratio, rates[:conv_blocks]
        )
        self._build_patch_embed(conv_dims, embed_dim)
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
                    drop_path=rate,
                    attn_mode=attn_mode,
                    window_size=window_size,
                    attn_topk=attn_topk,
                )
                for rate in rates[conv_blocks:]
            ]
        )
        if fuse_stages:
            self.conv.build_fusion(self, conv_dims, embed_dim)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

        names = self.conv.stage_modules(len(conv_dims))
        self.feature_info = [dict(num_chs=dim, reduction=4 * 2**i, module=names[i]) for i, dim in enumerate(conv_dims)]
        self.feature_info += [dict(num_chs=embed_dim, reduction=16, module=f"blocks.{i}") for i in range(depth)]
        self._init_weights()

    def _build_patch_embed(self, conv_dims: Sequence[int], embed_dim: int) -> None:
        if len(conv_dims) == 3:  # the stride-16 map -> tokens, one 1x1 projection per position
            self.patch_embed: nn.Module = nn.Conv2d(conv_dims[2], embed_dim, 1)
        else:  # stride 8 -> 16 as a linear map of 2x2 cells, so it can run on visible patches only
            self.patch_norm = nn.LayerNorm(conv_dims[1], eps=1e-6)
            self.patch_embed = nn.Linear(4 * conv_dims[1], embed_dim)

    # ---------------------------------------------------------------- init and timm contract
    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d) and self.conv.kaiming_init(name):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")  # timm ResNet init
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                trunc_normal_(module.weight, std=0.02)  # ViT init
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.conv.finish_init(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise lr decay: conv stages and embeddings first, then each ViT block."""
        # timm orders groups by (key ordinal in this dict, regex groups, suffix)
        blocks = r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^fuse|^norm", (99999,))]
        return dict(self.conv.group_matcher(), blocks=blocks)

    # ---------------------------------------------------------------- runtime switches (same weights)
    def set_attention(self, attn_mode: str, window_size: int | None = None, topk: int | None = None) -> None:
        """Switch every block's attention pattern; weights are unchanged (compare modes on one model)."""
        check_attention(attn_mode, window_size or self.window_size, topk or 1)
        self.attn_mode = attn_mode
        self.window_size = window_size or self.window_size
        for block in self.blocks:
            block.attn.attn_mode = attn_mode
            block.attn.window_size = self.window_size
            block.attn.topk = topk or block.attn.topk

    def set_token_selection(
        self,
        keep_rate: float = 1.0,
        keep_share: float | None = None,
        blocks: Sequence[int] | None = None,
        min_keep: int = 1,
    ) -> None:
        """Turn token selection on/off (keep_rate=1, keep_share=None = off); same weights."""
        try:
            self.token_select = TokenSelectConfig(keep_rate, keep_share, min_keep)
        except ValueError as err:
            raise ModelOptionError(str(err)) from None
        if blocks is not None:
            if any(not 0 <= i < self.depth for i in blocks):
                raise ModelOptionError(f"token_select_blocks {tuple(blocks)} out of range for depth {self.depth}")
            self.token_select_blocks = tuple(blocks)

    # ---------------------------------------------------------------- stages
    def forward_conv(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Image ``[B, 3, H, W]`` -> conv stage maps at strides 4, 8(, 16): NCHW (``resnet``) or channels-last
        (``convnext``). With ``mask [B, H/16, W/16]`` (True = hidden), hidden positions are zero in every map
        and nothing from hidden pixels reaches visible outputs."""
        return self.conv.forward(self, x, mask)

    def fusion_tokens(self, maps: list[torch.Tensor], pos: torch.Tensor) -> torch.Tensor | None:
        """Stride-4/8 maps projected to the stride-16 tokens at grid positions ``pos [B, M]`` -> ``[B, M, D]``
        (None when ``fuse_stages`` is off). Positions -1 (the token fusing dropped tokens) get zeros."""
        return self.conv.fusion(self, maps, pos) if self.fuse_stages else None

    def _patch_tokens(
        self, maps: list[torch.Tensor], grid: tuple[int, int], ids_keep: torch.Tensor | None
    ) -> torch.Tensor:
        """Last conv map -> ``[B, 1+N(visible), D]`` tokens with position embedding, class token first."""
        B = maps[0].shape[0]
        pos_embed = self._pos_embed_for(grid)  # [1, N, D]
        if len(maps) == 3:
            tokens = self.patch_embed(nchw(maps[2], self.conv.channels_last)).flatten(2).transpose(1, 2) + pos_embed
            if ids_keep is not None:
                tokens = gather_rows(tokens, ids_keep)  # [B, Nv, D]
        else:
            cells = patchify_nhwc(self.patch_norm(nhwc(maps[1], self.conv.channels_last)), 2)  # [B, N, 4*C8]
            pos_embed = pos_embed.expand(B, -1, -1)  # [B, N, D]
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
        """Shared body of every forward; returns pre-norm tokens, fusion (or None), layout, kept, stage maps."""
        B = x.shape[0]
        grid = token_grid(x)
        ids_keep = None
        if mask is not None:
            check_mask(mask, B, *grid)
            ids_keep, _ = visible_indices(mask.flatten(1))
        maps = self.forward_conv(x, mask)
        tokens = self._patch_tokens(maps, grid, ids_keep)
        layout = (
            TokenLayout.for_grid(B, grid, x.device) if ids_keep is None else TokenLayout.for_visible(ids_keep, grid)
        )
        tokens, layout, kept = self.forward_blocks(tokens, layout, select=select)
        return tokens, self.fusion_tokens(maps, layout.pos[:, 1:]), layout, kept, maps

    def _normed(self, tokens: torch.Tensor, fusion: torch.Tensor | None, layout: TokenLayout) -> torch.Tensor:
        """Fusion added to the patch tokens, final norm, padding (from adaptive selection) zeroed."""
        if fusion is not None:
            tokens = torch.cat([tokens[:, :1], tokens[:, 1:] + fusion], dim=1)
        out = self.norm(tokens)
        return out if layout.valid is None else out * layout.valid[..., None].to(out.dtype)

    def _selecting(self, x: torch.Tensor) -> bool:
        """Whether this forward selects tokens; selection under FX tracing is a clear error."""
        if self.token_select.enabled and isinstance(x, torch.fx.Proxy):
            raise torch.fx.proxy.TraceError(
                "token selection keeps a data-dependent number of tokens, which FX cannot trace; trace the "
                "model with model.set_token_selection(1.0) (same weights), then switch it back on"
            )
        return self.token_select.enabled

    def _stage_means(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [m.mean(dim=(1, 2) if self.conv.channels_last else (2, 3)) for m in maps]

    # ---------------------------------------------------------------- public forwards
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, 3, H, W]`` -> normed tokens ``[B, 1+N, C]`` (class token first, multi-scale fused).

        With token selection on, N is the largest per-image count kept plus the fused token;
        ``last_token_mask [B, 1+N]`` marks padding (zeroed in the output) and ``last_tokens_kept [B]``
        the patch tokens each image kept. Without selection N = H*W/256 and the mask is None.
        """
        tokens, fusion, layout, kept, maps = self._encode(x, None, self._selecting(x))
        self._keep_stage_means(maps, channels_last=self.conv.channels_last)
        out = self._normed(tokens, fusion, layout)
        if isinstance(x, torch.fx.Proxy):  # a graph has no side channel: keep the last eager statistics
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
        if token_mask is None and self.last_token_mask is not None and self.last_token_mask.shape == x.shape[:2]:
            token_mask = self.last_token_mask
        if self.global_pool == "multiscale":
            x = self.head_drop(self._multiscale_head_input(x, token_mask))
        else:
            x = self.head_drop(self.pool(x, token_mask))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "multiscale":  # one pass, no side channel (traceable)
            return self.head(self.head_drop(self.forward_multiscale(x)))
        return self.forward_head(self.forward_features(x))

    def forward_multiscale(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-scale pooled embedding ``[B, sum C_i + 2D]``: GAP of each conv stage map, class token and
        patch mean (over the tokens kept when selection is on), each L2-normalized, concatenated."""
        tokens, fusion, layout, _, maps = self._encode(x, None, self._selecting(x))
        out = self._normed(tokens, fusion, layout)  # [B, 1+N, D]
        return multiscale_pool(self._stage_means(maps), out, layout.valid)

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        """Masked-image-modeling encoder pass; ``mask [B, H/16, W/16]`` bool, True = hidden.

        Every image must hide the same number of patches (ValueError otherwise). Returns
        ``tokens [B, 1+Nv, C]`` (normed encoder output, class token first, visible patches in
        ascending position), ``fused [B, 1+Nv, C]`` (encoder output + stride-4/8 features projected
        to stride 16, normed: the MIM decoder input), ``ids_keep [B, Nv]``, ``ids_restore [B, N]``
        (MAE convention), ``mask [B, N]`` (True = hidden), ``pyramid`` (the conv stage maps, NCHW, hidden
        positions zero) and ``grid``. Token selection does not run here: the masked pass already keeps only
        the visible tokens, and the MIM decoder needs each of them at its position (docs/backbone.md).
        """
        tokens, fusion, layout, _, maps = self._encode(x, mask, select=False)
        self.last_token_mask = None  # no padding here; a stale mask must not reach forward_head(fused)
        mask_flat = mask.flatten(1)
        ids_keep, ids_restore = visible_indices(mask_flat)
        return dict(
            tokens=self.norm(tokens),
            fused=self._normed(tokens, fusion, layout),
            ids_keep=ids_keep,
            ids_restore=ids_restore,
            mask=mask_flat,
            pyramid=[nchw(m, self.conv.channels_last) for m in maps],
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
        """timm's intermediate-feature API over ``feature_info``: [conv stage maps, block 0..depth-1].

        Block outputs are the patch tokens reshaped to ``[B, C, H/16, W/16]`` (NCHW) or ``[B, N, C]``
        (NLC); ``norm`` applies the final norm to them. Maps are full grids, so token selection must be off.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt}")
        if self.token_select.enabled:
            raise ModelOptionError(
                "forward_intermediates returns full token grids, which token selection does not keep: "
                "call model.set_token_selection(1.0) first (same weights)"
            )
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        B, num_conv = x.shape[0], len(self.conv_dims)
        grid = token_grid(x)
        maps = self.forward_conv(x)
        intermediates = [self._format_map(maps[i], output_fmt) for i in take_indices if i < num_conv]
        tokens = self._patch_tokens(maps, grid, None)
        layout = TokenLayout.for_grid(B, grid, x.device)
        allowed = attention_allowed(layout, self.attn_mode, self.window_size)
        blocks = self.blocks[: max(max_index - num_conv + 1, 0)] if stop_early else self.blocks
        for index, block in enumerate(blocks):
            tokens, _, _ = self._run(block, tokens, layout, allowed, None)
            if index + num_conv in take_indices:
                out = (self.norm(tokens) if norm else tokens)[:, 1:]
                if output_fmt == "NCHW":
                    out = out.reshape(B, grid[0], grid[1], -1).permute(0, 3, 1, 2)
                intermediates.append(out)
        if intermediates_only:
            return intermediates
        return self._normed(tokens, self.fusion_tokens(maps, layout.pos[:, 1:]), layout), intermediates

    def _format_map(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        x = nchw(x, self.conv.channels_last)
        return x if output_fmt == "NCHW" else x.flatten(2).transpose(1, 2)


_DEFAULT_CONV = {"resnet": ((64, 128, 256), (2, 2, 2)), "convnext": ((48, 96), (1, 1))}


def _conv_defaults(kind: str, dims: Sequence[int] | None, depths: Sequence[int] | None):
    if kind not in CONV_STAGES:
        raise ModelOptionError(f"conv_stages must be one of {tuple(CONV_STAGES)}, got {kind!r}")
    default_dims, default_depths = _DEFAULT_CONV[kind]
    return tuple(dims or default_dims), tuple(depths or default_depths)


def check_attention(attn_mode: str, window_size: int, topk: int) -> None:
    if attn_mode not in ATTN_MODES:
        raise ModelOptionError(f"attn_mode must be one of {ATTN_MODES}, got {attn_mode!r}")
    if window_size < 1 or topk < 1:
        raise ModelOptionError(f"window_size and attn_topk must be >= 1, got {window_size} and {topk}")


def check_options(img_size, kind, conv_dims, conv_depths, attn_mode, window_size, attn_topk, depth) -> None:
    """One-line errors for options the family cannot build (before any module is made)."""
    if img_size[0] % PATCH_SIZE or img_size[1] % PATCH_SIZE:
        raise ModelOptionError(f"img_size {img_size} must be a multiple of {PATCH_SIZE}")
    if len(conv_dims) != len(conv_depths) or len(conv_dims) not in (2, 3):
        raise ModelOptionError(
            f"conv_dims and conv_depths need 2 or 3 stages (strides 4/8 or 4/8/16) of equal length, got "
            f"{tuple(conv_dims)} and {tuple(conv_depths)}"
        )
    if min(conv_depths) < 1 or depth < 1:
        raise ModelOptionError(f"every conv stage and the transformer need >= 1 block, got {conv_depths}, {depth}")
    check_attention(attn_mode, window_size, attn_topk)


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


# The named presets: one table, the only difference between resvit_* and hybrid_* (what `ssl-hybrid search` starts
# from). Parameter counts at 224 px without a classifier.
PRESETS: dict[str, dict[str, Any]] = {
    # ~0.14 M: for fast tests and smoke runs
    "resvit_nano": dict(
        conv_stages="resnet",
        stem_dim=16,
        conv_dims=(16, 32, 64),
        conv_depths=(1, 1, 1),
        embed_dim=64,
        depth=1,
        num_heads=2,
    ),
    # ~6 M: ResNet-18's stem and layer1-3 (strides 4/8/16), then 4 ViT blocks of width 256 (the default model)
    "resvit_tiny": dict(
        conv_stages="resnet",
        stem_dim=64,
        conv_dims=(64, 128, 256),
        conv_depths=(2, 2, 2),
        embed_dim=256,
        depth=4,
        num_heads=4,
    ),
    # ~19 M: ResNet-34-like conv stages (3/4/6 blocks of 64/128/256), then 6 ViT blocks of width 384
    "resvit_small": dict(
        conv_stages="resnet",
        stem_dim=64,
        conv_dims=(64, 128, 256),
        conv_depths=(3, 4, 6),
        embed_dim=384,
        depth=6,
        num_heads=6,
    ),
    # ~68 M: wider conv stages (96/192/384; 3/4/6 blocks), then 10 ViT blocks of width 640
    "resvit_base": dict(
        conv_stages="resnet",
        stem_dim=64,
        conv_dims=(96, 192, 384),
        conv_depths=(3, 4, 6),
        embed_dim=640,
        depth=10,
        num_heads=10,
    ),
    # ~0.6 M: for fast tests and smoke runs
    "hybrid_nano": dict(
        conv_stages="convnext", conv_dims=(16, 32), conv_depths=(1, 1), embed_dim=96, depth=4, num_heads=3
    ),
    # ~6 M: ViT-Ti width with light ConvNeXt stages
    "hybrid_tiny": dict(
        conv_stages="convnext", conv_dims=(32, 64), conv_depths=(1, 1), embed_dim=192, depth=12, num_heads=3
    ),
    # ~22 M, about ViT-S/16 FLOPs (one block fewer pays for the conv stages)
    "hybrid_small": dict(
        conv_stages="convnext", conv_dims=(48, 96), conv_depths=(1, 1), embed_dim=384, depth=11, num_heads=6
    ),
    # ~85 M, ViT-B width
    "hybrid_base": dict(
        conv_stages="convnext", conv_dims=(96, 192), conv_depths=(1, 1), embed_dim=768, depth=12, num_heads=12
    ),
}

default_cfgs = generate_default_cfgs({name: _cfg() for name in PRESETS})

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


def create_family(variant: str, pretrained: bool = False, **kwargs) -> HybridViT:
    """Build preset ``variant`` (a ``PRESETS`` name) with ``kwargs`` over its arguments, through timm's builder.

    The class is ``ResViT`` for ResNet stages and ``HybridViT`` for ConvNeXt stages: the same code, the name only
    says which stages a model has.
    """
    from ssl_hybrid.models.resvit import ResViT  # the subclass lives with its presets' docs

    args = dict(PRESETS[variant], **kwargs)
    model_class = ResViT if args["conv_stages"] == "resnet" else HybridViT
    factory_kwargs = {k: v for k, v in kwargs.items() if k not in _BUILDER_KWARGS}
    model = build_model_with_cfg(
        model_class,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(*range(len(args["conv_dims"])), -1)),
        **args,
    )
    model.model_name = variant
    model.factory_kwargs = factory_kwargs  # what export writes next to the weights
    return model


@register_model
def hybrid_nano(pretrained: bool = False, **kwargs) -> HybridViT:
    """~0.6 M params: for fast tests and smoke runs."""
    return create_family("hybrid_nano", pretrained, **kwargs)


@register_model
def hybrid_tiny(pretrained: bool = False, **kwargs) -> HybridViT:
    """~6 M params: ViT-Ti width with light conv stages."""
    return create_family("hybrid_tiny", pretrained, **kwargs)


@register_model
def hybrid_small(pretrained: bool = False, **kwargs) -> HybridViT:
    """~22 M params, about ViT-S/16 FLOPs (one block fewer pays for the conv stages)."""
    return create_family("hybrid_small", pretrained, **kwargs)


@register_model
def hybrid_base(pretrained: bool = False, **kwargs) -> HybridViT:
    """~85 M params, ViT-B width."""
    return create_family("hybrid_base", pretrained, **kwargs)
