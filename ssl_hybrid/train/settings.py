"""The knobs the training loop reads, resolved once from the config (the loop never reads the config)."""

from __future__ import annotations

from dataclasses import dataclass

from ssl_hybrid.config import Config, unused_settings

# Scheduled values logged with every step, when their objective is on.
SCHEDULED = ("lr", "weight_decay", "momentum", "teacher_temp")


@dataclass(frozen=True)
class LoopSettings:
    name: str  # the run's name, on the progress bar
    data: str  # data.train, for the error when the stream ends early
    steps: int  # the optimizer-step budget (train.steps)
    max_seconds: float  # the time budget (0 = none)
    grad_accum_steps: int  # micro-batches per optimizer step
    clip_grad: float  # gradient-norm clip (0 = none; the norm is logged either way)
    max_nonfinite_steps: int  # skipped non-finite steps in a row before the run stops
    log_every: int
    checkpoint_every: int  # 0 = only the final checkpoint
    knn_every: int  # the online k-NN monitor (0 = off)
    seed: int  # masks are a function of (seed, step, view, rank)
    mask_ratio: float
    logged_schedules: tuple[str, ...]  # SCHEDULED less those of objectives that are off

    @classmethod
    def from_config(cls, config: Config) -> LoopSettings:
        train, unused = config.train, unused_settings(config)
        return cls(
            name=config.name,
            data=f"{config.data.train}",
            steps=train.steps,
            max_seconds=train.max_seconds,
            grad_accum_steps=train.grad_accum_steps,
            clip_grad=config.optim.clip_grad,
            max_nonfinite_steps=train.max_nonfinite_steps,
            log_every=train.log_every,
            checkpoint_every=train.checkpoint_every,
            knn_every=train.knn_every,
            seed=train.seed,
            mask_ratio=config.objective.mask_ratio,
            logged_schedules=tuple(name for name in SCHEDULED if name not in unused),
        )
