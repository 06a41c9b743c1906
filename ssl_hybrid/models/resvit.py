"""The default model's presets, ``resvit_*``: the hybrid family (models/hybrid.py) with batch-normed ResNet stages.

Layout (strides relative to the image; ``resvit_tiny`` = ResNet-18's stem and layer1-3, then 4 ViT blocks):

    stem      7x7/2 conv + BN + ReLU + 3x3/2 max-pool      -> stride 4,  stem_dim channels
    stage1    residual basic blocks (3x3 conv + BN) x d1    -> stride 4,  conv_dims[0]
    stage2    basic blocks, the first one strided           -> stride 8,  conv_dims[1]
    stage3    basic blocks, the first one strided           -> stride 16, conv_dims[2]
    tokens    1x1 projection of the stride-16 map + position embedding + class token
    blocks    ViT blocks on the stride-16 tokens (global / window / top-k attention, token selection)
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
"""

from __future__ import annotations

from timm.models import register_model

from ssl_hybrid.models.conv_stages import BasicBlock, MaskedBatchNorm2d, keep_map  # noqa: F401  (their former home)
from ssl_hybrid.models.hybrid import (  # noqa: F401  (timm's registry and export read these from this module)
    HybridViT,
    checkpoint_filter_fn,
    create_family,
    default_cfgs,
)


class ResViT(HybridViT):
    """``HybridViT`` with ``conv_stages="resnet"`` by default: same code, the name says which stages it has."""

    default_conv_stages = "resnet"


@register_model
def resvit_nano(pretrained: bool = False, **kwargs) -> HybridViT:
    """~0.14 M params: for fast tests and smoke runs."""
    return create_family("resvit_nano", pretrained, **kwargs)


@register_model
def resvit_tiny(pretrained: bool = False, **kwargs) -> HybridViT:
    """~6 M params: ResNet-18's stem and layer1-3 (strides 4/8/16), then 4 ViT blocks of width 256."""
    return create_family("resvit_tiny", pretrained, **kwargs)


@register_model
def resvit_small(pretrained: bool = False, **kwargs) -> HybridViT:
    """~19 M params: ResNet-34-like conv stages (3/4/6 blocks of 64/128/256), then 6 ViT blocks of width 384."""
    return create_family("resvit_small", pretrained, **kwargs)


@register_model
def resvit_base(pretrained: bool = False, **kwargs) -> HybridViT:
    """~68 M params: wider conv stages (96/192/384; 3/4/6 blocks), then 10 ViT blocks of width 640."""
    return create_family("resvit_base", pretrained, **kwargs)
