"""Zero-cost proxy: NASWOT (Mellor et al., "Neural Architecture Search without Training", ICML 2021).

Why this one: it needs one forward pass of one unlabeled mini-batch at initialization (no labels, no
loss, no backward), which suits a self-supervised search whose training data is unlabeled, and it is
architecture-agnostic (it reads the activation layers, whatever the block type). It measures how
differently an untrained network's activation patterns separate the images of a batch: with binary
codes c_i (which units are "on" for image i), the kernel K_ij = #units where c_i and c_j agree, and the
score is log|K|. Networks whose codes distinguish inputs well tend to train to better accuracy.

Caveats worth stating: NASWOT was validated on supervised CNN benchmarks (NAS-Bench-101/201) with ReLU
codes; here activations are GELU (we use the sign of the pre-activation, the same on/off region) and the
downstream target is k-NN after SSL. It also grows with the number of units, so it is only used to prune
the clearly worst share *within* a budget, and the search records the rank correlation between it and
the trained proxy so its usefulness on the user's data is measured, not assumed.
"""

from __future__ import annotations

import logging
from typing import cast

import torch
from torch import nn

from ssl_hybrid.models.contract import TimmModel

log = logging.getLogger(__name__)

ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.ReLU6, nn.Hardswish, nn.LeakyReLU)


@torch.no_grad()
def naswot_score(model: nn.Module, images: torch.Tensor) -> float:
    """log|K| of the Hamming-agreement kernel of activation codes for ``images`` [B, 3, H, W] (B >= 2)."""
    batch = images.shape[0]
    kernel = torch.zeros(batch, batch, dtype=torch.float64)
    handles = []

    def hook(_module: nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
        codes = (inputs[0].detach().reshape(batch, -1) > 0).to(torch.float64)  # [B, units]
        kernel.add_(codes @ codes.T + (1 - codes) @ (1 - codes).T)  # units where images i and j agree

    for module in model.modules():
        if isinstance(module, ACTIVATIONS):
            handles.append(module.register_forward_hook(hook))
    if not handles:
        raise ValueError(f"{type(model).__name__}: no activation layers to read codes from")
    was_training = model.training
    try:
        model.eval()
        cast(TimmModel, model).forward_features(images)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    sign, logdet = torch.linalg.slogdet(kernel)
    return float(logdet) if sign > 0 else float("-inf")


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than 3 pairs."""
    import numpy as np
    from scipy.stats import spearmanr

    if len(x) < 3:
        return float("nan")
    value = spearmanr(np.asarray(x, dtype=float), np.asarray(y, dtype=float)).statistic
    return float(value)
