"""The two kinds of convolutional stages of the hybrid family (``HybridViT(conv_stages=...)``), masked-conv capable.

* ``resnet``: batch-normed ResNet basic blocks (``resvit_*``): 7x7/2 stem + BN + max-pool, then basic-block
  stages at strides 4/8(/16). Masked: hidden pixels are zeroed and every BN takes statistics over visible
  positions only; the convs run densely over the grid (the hidden share is computed, then zeroed).
* ``convnext``: ConvNeXt blocks (``hybrid_*``): 4x4/4 stem + LN, then 7x7-depthwise + MLP blocks with LN + 2x2/2
  downsampling between stages. Masked: the MLPs run on visible positions only (the masked speed-up).

Each kind is a stateless strategy (``model`` typed ``Any``: it is the model whose attributes it owns) that registers its
parameters directly on the model (so state-dict keys stay
``stem_conv``, ``stages.0.1.bn2``, ``stage1.0.mlp.fc1``... as the two families had them) and runs them. Maps are
NCHW for ``resnet`` and channels-last ``[B, H, W, C]`` for ``convnext`` (LN/MLP act on the last dim and visible
positions gather as rows); ``nchw``/``nhwc`` convert. Multi-scale fusion (ConvMAE) is per kind too: ``resnet``
average-pools the stride-4/8 maps to stride 16 and projects them, ``convnext`` projects each 4x4 / 2x2 cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, register_notrace_module
from torch import nn

from ssl_hybrid.models.contract import PATCH_SIZE
from ssl_hybrid.models.masking import upsample_mask, visible_indices


def patchify_nhwc(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B, (H/p)*(W/p), p*p*C]`` rows of non-overlapping p x p cells (raster order)."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // patch, patch, W // patch, patch, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, N, C]``, ``index [B, M]`` -> ``[B, M, C]``."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def at_positions(rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Grid rows ``[B, N, D]`` at token positions ``pos [B, M]``; positions -1 (global tokens) get zeros."""
    return gather_rows(rows, pos.clamp_min(0)) * (pos >= 0)[..., None].to(rows.dtype)


# -------------------------------------------------------------------------------------------- ResNet stages


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
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    unbiased = var * count / (count - 1).clamp_min(1.0)
                    self.running_mean.lerp_(mean.detach(), self.momentum)
                    self.running_var.lerp_(unbiased.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
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


class ResNetStages:
    """Batch-normed basic-block stages; parameters ``stem_conv``, ``stem_bn``, ``stages.<i>.<block>``."""

    kind = "resnet"
    channels_last = False

    @staticmethod
    def build(model: Any, in_chans: int, stem_dim: int, dims: Sequence[int], depths: Sequence[int], *_) -> None:
        model.stem_conv = nn.Conv2d(in_chans, stem_dim, 7, stride=2, padding=3, bias=False)
        model.stem_bn = MaskedBatchNorm2d(stem_dim)
        model.stem_pool = nn.MaxPool2d(3, stride=2, padding=1)
        ins = [stem_dim, *dims]
        model.stages = nn.ModuleList(
            nn.ModuleList(
                BasicBlock(ins[i] if b == 0 else dims[i], dims[i], 2 if b == 0 and i > 0 else 1) for b in range(depth)
            )
            for i, depth in enumerate(depths)
        )

    @staticmethod
    def stage_modules(num_stages: int) -> list[str]:
        return [f"stages.{i}" for i in range(num_stages)]

    @staticmethod
    def group_matcher() -> dict[str, str]:
        return dict(stem=r"^stem_", stages=r"^stages\.(\d+)", tokens=r"^cls_token|^pos_embed|^patch_")

    @staticmethod
    def kaiming_init(name: str) -> bool:
        return name.startswith(("stem_", "stages."))  # timm's ResNet init for the conv stages

    @staticmethod
    def finish_init(model: Any) -> None:
        for stage in model.stages:
            for block in stage:
                block.zero_init_last()

    @staticmethod
    def forward(model: Any, x: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        """Image -> NCHW maps at strides 4, 8(, 16); with ``mask`` hidden positions stay zero everywhere."""
        keeps: list[torch.Tensor | None] = [None] * 6
        if mask is not None:
            keeps = [keep_map(mask, stride, x.dtype) for stride in (1, 2, 4, 8, 16)] + [None]
            x = x * keeps[0]
        x = model.stem_pool(torch.relu(model.stem_bn(model.stem_conv(x), keeps[1])))  # [B, C0, H/4, W/4]
        if mask is not None:
            x = x * keeps[2]
        maps = []
        for index, stage in enumerate(model.stages):
            for block in stage:
                x = model._run(block, x, keeps[2 + index])
            maps.append(x)
        return maps

    @staticmethod
    def build_fusion(model: Any, dims: Sequence[int], embed_dim: int) -> None:
        model.fuse4 = nn.Linear(dims[0], embed_dim)
        model.fuse8 = nn.Linear(dims[1], embed_dim)

    @staticmethod
    def fusion(model: Any, maps: list[torch.Tensor], pos: torch.Tensor) -> torch.Tensor:
        """Stride-4/8 maps average-pooled to stride 16, projected, at token positions ``pos`` -> ``[B, M, D]``."""
        s4 = F.avg_pool2d(maps[0], 4).flatten(2).transpose(1, 2)  # [B, N, C4]
        s8 = F.avg_pool2d(maps[1], 2).flatten(2).transpose(1, 2)  # [B, N, C8]
        return at_positions(model.fuse4(s4) + model.fuse8(s8), pos)  # projected on the grid, then gathered


# ------------------------------------------------------------------------------------------ ConvNeXt stages


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


class ConvNeXtStages:
    """ConvNeXt stages; parameters ``stem_conv``, ``stem_norm``, ``stage1``, ``down8``, ``stage2`` (, ``down16``,
    ``stage3``)."""

    kind = "convnext"
    channels_last = True

    @staticmethod
    def build(
        model: Any,
        in_chans: int,
        stem_dim: int,
        dims: Sequence[int],
        depths: Sequence[int],
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rates: list[float] | None = None,
    ) -> None:
        rates = list(drop_path_rates or [0.0] * sum(depths))
        model.stem_conv = nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4)
        model.stem_norm = nn.LayerNorm(dims[0], eps=1e-6)
        for i, depth in enumerate(depths):
            if i > 0:
                setattr(model, f"down{4 * 2**i}", Downsample(dims[i - 1], dims[i]))
            blocks = [ConvBlock(dims[i], kernel_size, mlp_ratio, drop_path=rates.pop(0)) for _ in range(depth)]
            setattr(model, f"stage{i + 1}", nn.ModuleList(blocks))

    @staticmethod
    def stage_modules(num_stages: int) -> list[str]:
        return [f"stage{i + 1}" for i in range(num_stages)]

    @staticmethod
    def group_matcher() -> dict[str, str]:
        return dict(stem=r"^cls_token|^pos_embed|^stem|^stage\d|^down\d+|^patch_")

    @staticmethod
    def kaiming_init(name: str) -> bool:
        return False  # the ViT init (trunc_normal_ on every Linear/Conv2d) is what the ConvNeXt stages use

    @staticmethod
    def finish_init(model: Any) -> None:
        pass

    @staticmethod
    def forward(model: Any, x: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        """Image -> channels-last maps at strides 4, 8(, 16); with ``mask`` hidden positions are zero after the
        stem, every block and every downsampling, and the block MLPs run on visible positions only."""
        num_stages = len(model.conv_dims)
        x = model.stem_norm(model.stem_conv(x).permute(0, 2, 3, 1))  # [B, H/4, W/4, C4]
        maps = []
        for i in range(num_stages):
            visible = None
            if i > 0:
                x = getattr(model, f"down{4 * 2**i}")(x)  # [B, H/s, W/s, C_i]
            if mask is not None:
                hidden = upsample_mask(mask, PATCH_SIZE // (4 * 2**i))  # [B, H/s, W/s]
                x = x * (~hidden)[..., None].to(x.dtype)
                visible, _ = visible_indices(hidden.flatten(1))
            for block in getattr(model, f"stage{i + 1}"):
                x = model._run(block, x, visible)
            maps.append(x)
        return maps

    @staticmethod
    def build_fusion(model: Any, dims: Sequence[int], embed_dim: int) -> None:
        # ConvMAE's multi-scale fusion: 4x4 stride-4 cells and 2x2 stride-8 cells -> one stride-16 token
        model.fuse4 = nn.Linear(16 * dims[0], embed_dim)
        model.fuse8 = nn.Linear(4 * dims[1], embed_dim)

    @staticmethod
    def fusion(model: Any, maps: list[torch.Tensor], pos: torch.Tensor) -> torch.Tensor:
        """Each token's 4x4 stride-4 and 2x2 stride-8 cells, projected, at positions ``pos`` -> ``[B, M, D]``
        (gathered first, so only the kept tokens are projected)."""
        index = pos.clamp_min(0)
        fused = model.fuse4(gather_rows(patchify_nhwc(maps[0], 4), index)) + model.fuse8(
            gather_rows(patchify_nhwc(maps[1], 2), index)
        )  # [B, M, D]
        return fused * (pos >= 0)[..., None].to(fused.dtype)


CONV_STAGES = {kind.kind: kind for kind in (ResNetStages, ConvNeXtStages)}


def nchw(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.permute(0, 3, 1, 2) if channels_last else x


def nhwc(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x if channels_last else x.permute(0, 2, 3, 1)
