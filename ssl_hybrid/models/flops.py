"""Count FLOPs of any module with ``torch.utils.flop_counter.FlopCounterMode``.

FlopCounterMode counts what dominates compute (matmul, conv, attention kernels; 1 multiply-add = 2
FLOPs) by intercepting the ops actually run, so data-dependent paths (masking, token selection,
window attention) are counted as executed. Elementwise ops (norms, activations, the optimizer
update) are not counted; they are a few percent of a ViT step.

torch's formula for ``convolution_backward`` ignores ``groups`` in the weight gradient, so it
counts a depthwise conv's weight gradient C times over (ConvNeXt's 7x7 depthwise convs made
convnext_atto's train step look 8x its forward). We register a corrected formula: the weight
gradient does exactly the forward conv's multiply-adds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count


def conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    """FLOPs of ``aten.convolution_backward`` with grouped convs counted correctly."""
    flops = 0
    if output_mask[0]:  # grad_input: a transposed conv of grad_out with the same (grouped) weight
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:  # grad_weight: one multiply-add per forward multiply-add
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


CUSTOM_FLOP_FORMULAS = {torch.ops.aten.convolution_backward: conv_backward_flop}


def _first_tensor_sum(output: Any) -> torch.Tensor:
    """A scalar to backpropagate from whatever the forward returned (tensor, dict, list)."""
    if isinstance(output, torch.Tensor):
        return output.float().sum()
    values = output.values() if isinstance(output, dict) else output
    total = sum(v.float().sum() for v in values if isinstance(v, torch.Tensor) and v.requires_grad)
    if not isinstance(total, torch.Tensor):
        raise ValueError("forward output has no tensor that requires grad; cannot count a train step")
    return total


def count_flops(
    model: nn.Module,
    example: torch.Tensor | Sequence[int],
    train_step: bool = False,
    forward_fn: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> float:
    """FLOPs of one forward (``train_step=False``, under no_grad) or forward + backward.

    ``example`` is an input tensor or a shape such as ``(16, 3, 224, 224)`` (random input).
    ``forward_fn(model, x)`` replaces ``model(x)``, e.g. ``lambda m, x: m.forward_masked(x, mask)``.
    """
    x = example if isinstance(example, torch.Tensor) else torch.randn(*example)
    forward_fn = forward_fn or (lambda m, inp: m(inp))
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOP_FORMULAS)
    if train_step:
        with counter:
            _first_tensor_sum(forward_fn(model, x)).backward()
        model.zero_grad(set_to_none=True)
    else:
        with counter, torch.no_grad():
            forward_fn(model, x)
    return float(counter.get_total_flops())
