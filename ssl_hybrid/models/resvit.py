"""Conv-heavy hybrid: ResNet basic-block stages with batch norm carry the compute, ViT blocks add global
context. Registered with timm as ``resvit_*``.

Layout (strides relative to the image; ``resvit_tiny`` = ResNet-18's stem and layer1-3, then 4 ViT blocks):

    stem      7x7/2 conv + BN + ReLU + 3x3/2 max-pool      -> stride 4,  stem_dim channels
    stage1    residual basic blocks (3x3 conv + BN) x d1    -> stride 4,  conv_dims[0]
    stage2    basic blocks, the first one strided           -> stride 8,  conv_dims[1]
    stage3    basic blocks, the first one strided           -> stride 16, conv_dims[2]
    tokens    1x1 projection of the stride-16 map + position embedding + class token
    blocks    timm ViT blocks on the stride-16 tokens       (global relations between parts)
    fusion    stage1/stage2 maps average-pooled to stride 16, projected and added to the patch tokens
              before the final norm (ConvMAE's multi-scale fusion)

Why this shape: at a few CPU-minutes of pretraining the features a network has *before* training decide
most of the result, and batch-normed 3x3 residual stages give good random features and learn fast
(DESIGN.md, "Measured on this machine"): most of the FLOPs sit in the conv stages, the transformer is a
short global-context head on 1/256 as many positions.

Masked forward (MIM, SparK-style): hidden 16-px patches are zeroed in the input and after every conv and
norm, and batch norm takes its statistics over visible positions only, so visible outputs never depend on
hidden pixels; the transformer then sees the visible tokens only. The conv stages still run densely over
the whole grid, so the masked step saves only the transformer's share (reported in benchmarks, not hidden).

``forward_multiscale`` returns the multi-scale pooled embedding (GAP of every conv stage, class token and
patch mean, each L2-normalized, concatenated) that the evaluators use when a backbone offers it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block
from torch import nn

from ssl_hybrid.models.contract import PATCH_SIZE, TokenBackboneMixin, check_global_pool, multiscale_pool
from ssl_hybrid.models.hybrid import _BUILDER_KWARGS, _cfg, checkpoint_filter_fn
from ssl_hybrid.models.masking import check_mask, visible_indices


@register_notrace_module  # reason: a leaf like nn.BatchNorm2d (FX cannot trace its input-dim check)
class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose statistics (and running estimates) come from visible positions only.

    ``keep [B, 1, H, W]`` (1 = visible) switches the masked path on; hidden positions of the output are
    zero. Without ``keep`` it is exactly ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if keep is None:
            return super().forward(x)
        if self.training or not self.track_running_stats:
            count = keep.sum() * 1.0  # visible positions over batch and space
            mean = (x * keep).sum(dim=(0, 2, 3)) / count  # [C]
            var = ((x - mean[None, :, None, None]) ** 2 * keep).sum(dim=(0, 2, 3)) / count  # [C], biased
            if self.training and self.track_running_stats:
                # track_running_stats: the buffers exist (BatchNorm types them Optional)
                running_mean, running_var = cast(torch.Tensor, self.running_mean), cast(torch.Tensor, self.running_var)
                batches = cast(torch.Tensor, self.num_batches_tracked)
                with torch.no_grad():
                    batches.add_(1)
                    unbiased = var * count / (count - 1).clamp_min(1.0)
                    # momentum=None is nn.BatchNorm2d's cumulative moving average
                    momentum = 1.0 / float(batches) if self.momentum is None else self.momentum
                    running_mean.lerp_(mean.detach(), momentum)
                    running_var.lerp_(unbiased.detach(), momentum)
        else:
            mean, var = cast(torch.Tensor, self.running_mean), cast(torch.Tensor, self.running_var)
        scale = self.weight * torch.rsqrt(var + self.eps)  # [C]
        out = (x - mean[None, :, None, None]) * scale[None, :, None, None] + self.bias[None, :, None, None]
        return out * keep


class BasicBlock(nn.Module):
    """ResNet basic block (3x3 conv-BN-ReLU, 3x3 conv-BN, + shortcut, ReLU), masked-conv capable.

    ``keep [B, 1, H', W']`` at the *output* resolution zeroes hidden positions after every norm; the
    input must already be zero there (it is, when it comes from a masked block or the masked stem).
    """

    def __init__(self, in_dim: int, out_dim: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, stride=stride, padding=1, bias=False)
        self.bn1 = MaskedBatchNorm2d(out_dim)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False)
        self.bn2 = MaskedBatchNorm2d(out_dim)
        self.act = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_dim != out_dim:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_dim, out_dim, 1, stride=stride, bias=False), MaskedBatchNorm2d(out_dim)
            )

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)  # each block starts as identity (timm's ResNet default)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample[1](self.downsample[0](x), keep)
        out = self.act(self.bn1(self.conv1(x), keep))
        out = self.bn2(self.conv2(out), keep)
        return self.act(out + shortcut)


def keep_map(mask: torch.Tensor, stride: int, dtype: torch.dtype) -> torch.Tensor:
    """Patch mask ``[B, h, w]`` (True = hidden, 16-px patches) -> ``[B, 1, 16h/stride, 16w/stride]``, 1 = visible."""
    factor = PATCH_SIZE // stride
    keep = (~mask).to(dtype)[:, None]  # [B, 1, h, w]
    return keep.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3) if factor > 1 else keep


class ResViT(TokenBackboneMixin, nn.Module):
    """ResNet basic-block stages at strides 4/8/16 + ViT blocks on the stride-16 tokens. See the module docstring."""

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token_avg",
        stem_dim: int = 64,
        conv_dims: Sequence[int] = (64, 128, 256),
        conv_depths: Sequence[int] = (2, 2, 2),
        embed_dim: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        fuse_stages: bool = True,
    ):
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] % PATCH_SIZE or img_size[1] % PATCH_SIZE:
            raise ValueError(f"img_size {img_size} must be a multiple of {PATCH_SIZE}")
        check_global_pool(global_pool)
        if len(conv_dims) != 3 or len(conv_depths) != 3:
            raise ValueError(
                f"conv_dims and conv_depths need 3 stages (strides 4/8/16), got {conv_dims}, {conv_depths}"
            )
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = PATCH_SIZE
        self.img_size = img_size
        self.patch_grid = (img_size[0] // PATCH_SIZE, img_size[1] // PATCH_SIZE)
        self.num_prefix_tokens = 1
        self.depth = depth
        self.grad_checkpointing = False
        self.fuse_stages = fuse_stages
        self.num_multiscale_features = sum(conv_dims) + 2 * embed_dim  # forward_multiscale's width

        self.stem_conv = nn.Conv2d(in_chans, stem_dim, 7, stride=2, padding=3, bias=False)
        self.stem_bn = MaskedBatchNorm2d(stem_dim)
        self.stem_pool = nn.MaxPool2d(3, stride=2, padding=1)
        dims = [stem_dim, *conv_dims]
        self.stages = nn.ModuleList()
        for index, stage_depth in enumerate(conv_depths):
            stride = 1 if index == 0 else 2
            self.stages.append(
                nn.ModuleList(
                    [
                        BasicBlock(dims[index] if b == 0 else dims[index + 1], dims[index + 1], stride if b == 0 else 1)
                        for b in range(stage_depth)
                    ]
                )
            )
        self.patch_embed = nn.Conv2d(conv_dims[2], embed_dim, 1)  # stride-16 map -> tokens, per position
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_grid[0] * self.patch_grid[1], embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth decay rule
        self.blocks = nn.ModuleList(
            [
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[i],
                )
                for i in range(depth)
            ]
        )
        self.fuse4 = nn.Linear(conv_dims[0], embed_dim) if fuse_stages else None
        self.fuse8 = nn.Linear(conv_dims[1], embed_dim) if fuse_stages else None
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

        self.feature_info = [dict(num_chs=conv_dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(3)]
        self.feature_info += [dict(num_chs=embed_dim, reduction=16, module=f"blocks.{i}") for i in range(depth)]
        self._init_weights()

    # ---------------------------------------------------------------- init and timm contract
    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d) and not name.startswith("patch_embed"):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")  # timm ResNet init
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                trunc_normal_(module.weight, std=0.02)  # ViT init for the token side
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for stage in self.stages:
            for block in cast(Iterable[BasicBlock], stage):
                block.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise lr decay: stem, each conv stage, tokens, each ViT block, then the rest."""
        # timm orders groups by (key ordinal in this dict, regex groups, suffix)
        return dict(
            stem=r"^stem_",
            stages=r"^stages\.(\d+)",
            tokens=r"^cls_token|^pos_embed|^patch_embed",
            blocks=r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^fuse|^norm", (99999,))],
        )

    # ---------------------------------------------------------------- stages
    def forward_conv(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Image ``[B, 3, H, W]`` -> stage maps [stride 4, 8, 16] ``[B, C_i, H/s, W/s]`` (NCHW).

        With ``mask [B, H/16, W/16]`` (True = hidden) the hidden pixels are zeroed first and every map stays
        zero at hidden positions, with batch statistics over visible positions only (no information leaks).
        """
        keeps: list[torch.Tensor | None] = [None] * 4
        if mask is not None:
            keeps = [keep_map(mask, stride, x.dtype) for stride in (1, 2, 4, 8, 16)]
        if keeps[0] is not None:  # a mask is given
            x = x * keeps[0]
        stem = torch.relu(self.stem_bn(self.stem_conv(x), keeps[1]))  # [B, C0, H/2, W/2]
        x = self.stem_pool(stem)  # [B, C0, H/4, W/4]
        if keeps[2] is not None:
            x = x * keeps[2]
        maps = []
        for index, stage in enumerate(self.stages):
            keep = keeps[2 + index] if mask is not None else None
            for block in cast(Iterable[BasicBlock], stage):
                x = self._run(block, x, keep)
            maps.append(x)
        return maps

    def _tokens(self, s16: torch.Tensor, grid: tuple[int, int], ids_keep: torch.Tensor | None) -> torch.Tensor:
        """Stride-16 map -> ``[B, 1+N(visible), D]`` tokens with position embedding, class token first."""
        B = s16.shape[0]
        tokens = self.patch_embed(s16).flatten(2).transpose(1, 2) + self._pos_embed_for(grid)  # [B, N, D]
        if ids_keep is not None:
            tokens = tokens.gather(1, ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))  # [B, Nv, D]
        return torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)

    def _fusion(self, maps: list[torch.Tensor], ids_keep: torch.Tensor | None) -> torch.Tensor | None:
        """Stride-4/8 maps average-pooled to stride 16 and projected -> ``[B, N(visible), D]`` (None when off)."""
        if self.fuse4 is None or self.fuse8 is None:  # fuse_stages=False
            return None
        s4 = F.avg_pool2d(maps[0], 4).flatten(2).transpose(1, 2)  # [B, N, C4]
        s8 = F.avg_pool2d(maps[1], 2).flatten(2).transpose(1, 2)  # [B, N, C8]
        fused = self.fuse4(s4) + self.fuse8(s8)  # [B, N, D]
        if ids_keep is not None:
            fused = fused.gather(1, ids_keep[..., None].expand(-1, -1, fused.shape[-1]))
        return fused

    def forward_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = self._run(block, tokens)
        return tokens

    def _finish(self, tokens: torch.Tensor, fusion: torch.Tensor | None) -> torch.Tensor:
        """Add the multi-scale fusion to the patch tokens, then the final norm -> ``[B, 1+N, D]``."""
        if fusion is not None:
            tokens = torch.cat([tokens[:, :1], tokens[:, 1:] + fusion], dim=1)
        return self.norm(tokens)

    # ---------------------------------------------------------------- public forwards
    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Shared body of forward_features / forward_multiscale: (normed tokens ``[B, 1+N, C]``, stage maps)."""
        maps = self.forward_conv(x)
        tokens = self.forward_blocks(self._tokens(maps[2], self._grid_of(x), None))
        return self._finish(tokens, self._fusion(maps, None)), maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, 3, H, W]`` -> normed tokens ``[B, 1+N, C]`` (class token first, multi-scale fused)."""
        tokens, maps = self._encode(x)
        self._keep_stage_means(maps)
        return tokens

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1+N, C]`` -> ``[B, C]``: class token, mean of patch tokens, or (default) their average."""
        if self.global_pool == "":
            return x
        if self.global_pool == "token":
            return x[:, 0]
        mean = x[:, 1:].mean(dim=1)
        return mean if self.global_pool == "avg" else 0.5 * (x[:, 0] + mean)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self._multiscale_head_input(x) if self.global_pool == "multiscale" else self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "multiscale":  # one pass, no side channel (traceable)
            return self.head(self.head_drop(self.forward_multiscale(x)))
        return self.forward_head(self.forward_features(x))

    def forward_multiscale(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-scale pooled embedding ``[B, C4 + C8 + C16 + 2D]``: GAP of each conv stage, class token and
        patch mean, each L2-normalized (so no scale dominates by its magnitude), concatenated."""
        out, maps = self._encode(x)  # [B, 1+N, D], stage maps
        return multiscale_pool([m.mean(dim=(2, 3)) for m in maps], out)

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        """Masked-image-modeling encoder pass; ``mask [B, H/16, W/16]`` bool, True = hidden.

        Same contract as ``HybridViT.forward_masked``: ``tokens``/``fused`` ``[B, 1+Nv, C]`` (normed; fused adds
        the stride-4/8 fusion), ``ids_keep [B, Nv]``, ``ids_restore [B, N]``, ``mask [B, N]``, ``pyramid``
        (stage maps, hidden positions zero) and ``grid``.
        """
        B = x.shape[0]
        grid = self._grid_of(x)
        check_mask(mask, B, *grid)
        mask_flat = mask.flatten(1)
        ids_keep, ids_restore = visible_indices(mask_flat)
        maps = self.forward_conv(x, mask)
        tokens = self.forward_blocks(self._tokens(maps[2], grid, ids_keep))
        return dict(
            tokens=self.norm(tokens),
            fused=self._finish(tokens, self._fusion(maps, ids_keep)),
            ids_keep=ids_keep,
            ids_restore=ids_restore,
            mask=mask_flat,
            pyramid=maps,
            grid=grid,
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
        """timm's intermediate-feature API over ``feature_info``: [stage 4/8/16 maps, block 0..depth-1].

        Block outputs are the patch tokens as ``[B, C, H/16, W/16]`` (NCHW) or ``[B, N, C]`` (NLC); ``norm``
        applies the final norm to them.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        B = x.shape[0]
        grid = self._grid_of(x)
        maps = self.forward_conv(x)
        intermediates = [
            maps[i] if output_fmt == "NCHW" else maps[i].flatten(2).transpose(1, 2) for i in take_indices if i < 3
        ]
        tokens = self._tokens(maps[2], grid, None)
        blocks = self.blocks[: max(max_index - 2, 0)] if stop_early else self.blocks
        for index, block in enumerate(blocks):
            tokens = self._run(block, tokens)
            if index + 3 in take_indices:
                out = (self.norm(tokens) if norm else tokens)[:, 1:]
                if output_fmt == "NCHW":
                    out = out.reshape(B, grid[0], grid[1], -1).permute(0, 3, 1, 2)
                intermediates.append(out)
        if intermediates_only:
            return intermediates
        return self._finish(tokens, self._fusion(maps, None)), intermediates


# -------------------------------------------------------------------- timm registration

default_cfgs = generate_default_cfgs(
    {name: _cfg() for name in ("resvit_nano", "resvit_tiny", "resvit_small", "resvit_base")}
)


def _create_resvit(variant: str, pretrained: bool, model_args: dict[str, Any], **kwargs) -> ResViT:
    factory_kwargs = {k: v for k, v in kwargs.items() if k not in _BUILDER_KWARGS}
    model = build_model_with_cfg(
        ResViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, -1)),
        **dict(model_args, **kwargs),
    )
    model.model_name = variant
    model.factory_kwargs = factory_kwargs  # what export writes next to the weights
    return model


@register_model
def resvit_nano(pretrained: bool = False, **kwargs) -> ResViT:
    """~0.14 M params: for fast tests and smoke runs."""
    args = dict(stem_dim=16, conv_dims=(16, 32, 64), conv_depths=(1, 1, 1), embed_dim=64, depth=1, num_heads=2)
    return _create_resvit("resvit_nano", pretrained, args, **kwargs)


@register_model
def resvit_tiny(pretrained: bool = False, **kwargs) -> ResViT:
    """~6 M params: ResNet-18's stem and layer1-3 (strides 4/8/16), then 4 ViT blocks of width 256."""
    args = dict(stem_dim=64, conv_dims=(64, 128, 256), conv_depths=(2, 2, 2), embed_dim=256, depth=4, num_heads=4)
    return _create_resvit("resvit_tiny", pretrained, args, **kwargs)


@register_model
def resvit_small(pretrained: bool = False, **kwargs) -> ResViT:
    """~19 M params: ResNet-34-like conv stages (3/4/6 blocks of 64/128/256), then 6 ViT blocks of width 384."""
    args = dict(stem_dim=64, conv_dims=(64, 128, 256), conv_depths=(3, 4, 6), embed_dim=384, depth=6, num_heads=6)
    return _create_resvit("resvit_small", pretrained, args, **kwargs)


@register_model
def resvit_base(pretrained: bool = False, **kwargs) -> ResViT:
    """~68 M params: wider conv stages (96/192/384; 3/4/6 blocks), then 10 ViT blocks of width 640."""
    args = dict(stem_dim=64, conv_dims=(96, 192, 384), conv_depths=(3, 4, 6), embed_dim=640, depth=10, num_heads=10)
    return _create_resvit("resvit_base", pretrained, args, **kwargs)
