"""Step-indexed schedules, precomputed as arrays (dinov2): lr, weight decay, EMA momentum, teacher temp.

Every value a step uses is ``schedules[name][step]``; they are saved in checkpoints, so a resumed
run provably uses the same values, and they are easy to plot and test.
"""

from __future__ import annotations

import numpy as np

from ssl_hybrid.config import Config, derived_values


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


def build_schedules(config: Config, num_processes: int = 1) -> dict[str, np.ndarray]:
    """All per-step values for ``config.train.steps`` optimizer steps, float64 arrays."""
    derived = derived_values(config, num_processes)
    steps = config.train.steps
    optim, objective = config.optim, config.objective
    return {
        "lr": warmup_cosine(derived["effective_lr"], derived["effective_min_lr"], steps, derived["warmup_steps"]),
        "weight_decay": cosine(optim.weight_decay, optim.weight_decay_end, steps),
        # The teacher moves fast early and freezes at the end (DINO's cosine momentum to 1).
        "momentum": cosine(objective.momentum_teacher, 1.0, steps),
        "teacher_temp": linear_then_constant(
            objective.warmup_teacher_temp, objective.teacher_temp, steps, derived["teacher_temp_warmup_steps"]
        ),
    }
