"""Pretraining's step-indexed schedules, precomputed as arrays (dinov2): lr, weight decay, EMA momentum, teacher
temp, built from the curves in :mod:`ssl_hybrid.schedules`.

Every value a step uses is ``schedules[name][step]``; they are saved in checkpoints, so a resumed
run provably uses the same values, and they are easy to plot and test.
"""

from __future__ import annotations

import numpy as np

from ssl_hybrid.config import Config, derived_values
from ssl_hybrid.schedules import cosine, linear_then_constant, warmup_cosine


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
