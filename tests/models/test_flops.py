"""FLOP counting against hand counts, and what masking cuts."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import ssl_hybrid.models  # noqa: F401
from ssl_hybrid.models.flops import count_flops
from ssl_hybrid.models.masking import random_grid_mask


def test_count_flops_matches_hand_count_for_linear_and_conv():
    linear = torch.nn.Linear(32, 16)
    assert count_flops(linear, (4, 32)) == 2 * 4 * 32 * 16
    # fwd + weight grad; the input needs no grad, so backward skips grad-input (as for a first layer)
    assert count_flops(linear, (4, 32), train_step=True) == 2 * 2 * 4 * 32 * 16
    conv = torch.nn.Conv2d(3, 8, 4, stride=4)
    assert count_flops(conv, (1, 3, 16, 16)) == 2 * 8 * 3 * 4 * 4 * 4 * 4


def test_count_flops_counts_depthwise_conv_backward_once_per_forward_multiply_add():
    from torch.utils.flop_counter import FlopCounterMode

    depthwise = torch.nn.Conv2d(32, 32, 7, padding=3, groups=32)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    forward = count_flops(depthwise, x)
    assert forward == 2 * 2 * 32 * 8 * 8 * 49
    assert count_flops(depthwise, x, train_step=True) == 3 * forward  # fwd + grad input + grad weight
    dense = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    with FlopCounterMode(display=False) as torch_counter:  # torch's own formula is right without groups
        dense(x).sum().backward()
    assert count_flops(dense, x, train_step=True) == torch_counter.get_total_flops()


@pytest.mark.slow
def test_count_flops_on_hybrid_and_masking_cuts_flops(built):
    model = copy.deepcopy(built["hybrid_small"])
    x = torch.randn(1, 3, 224, 224)
    forward = count_flops(model, x)
    train = count_flops(model, x, train_step=True)
    assert 2.9 < train / forward < 3.1 and all(p.grad is None for p in model.parameters())
    mask = random_grid_mask(1, 14, 14, 0.75)
    masked = count_flops(model, x, forward_fn=lambda m, inp: m.forward_masked(inp, mask))
    assert masked < 0.4 * forward  # conv MLPs, fusion and transformer run on visible positions only
    vit = timm.create_model("vit_small_patch16_224")
    assert 0.85 < forward / count_flops(vit, x) < 1.15  # "near ViT-S/16 FLOPs"
