"""Step-indexed curves, precomputed as arrays (dinov2): pretraining (:mod:`ssl_hybrid.train.schedules`) and
fine-tuning (:mod:`ssl_hybrid.eval.finetune`) build their per-step values from these, so both warm up and
decay the same way."""

from __future__ import annotations

import numpy as np


def cosine(start: float, end: float, steps: int) -> np.ndarray:
    """Half-cosine from ``start`` (step 0) to ``end`` (last step); lightly's cosine_schedule, vectorized."""
    if steps <= 0:
        return np.zeros(0)
    if steps == 1:
        return np.array([end], dtype=np.float64)
    t = np.arange(steps) / (steps - 1)
    return end - (end - start) * (np.cos(np.pi * t) + 1) / 2


def warmup_cosine(peak: float, final: float, total: int, warmup: int, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine to ``final``; length ``total``."""
    warmup = min(warmup, total)
    ramp = np.linspace(warmup_start, peak, warmup, endpoint=False) if warmup else np.zeros(0)
    return np.concatenate([ramp, cosine(peak, final, total - warmup)])


def linear_then_constant(start: float, end: float, total: int, ramp_steps: int) -> np.ndarray:
    ramp_steps = min(ramp_steps, total)
    ramp = np.linspace(start, end, ramp_steps) if ramp_steps else np.zeros(0)
    return np.concatenate([ramp, np.full(total - ramp_steps, end)])
