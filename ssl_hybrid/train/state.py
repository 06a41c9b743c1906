"""The live state of one pretraining job and its checkpoint glue: what a checkpoint saves and restores."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ssl_hybrid import rng
from ssl_hybrid.config import Config, to_dict
from ssl_hybrid.objectives.combine import PretrainModel
from ssl_hybrid.train import checkpoint as ckpt
from ssl_hybrid.train.settings import LoopSettings

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ssl_hybrid.data.augment import BatchAugment
    from ssl_hybrid.data.stream import TrainStream
    from ssl_hybrid.train.monitor import KNNMonitor

log = logging.getLogger(__name__)

STATE_FORMAT = "ssl_hybrid-train/1"


@dataclass
class Counters:
    """Everything about the run's progress that a checkpoint must restore besides weights and RNG."""

    step: int = 0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    images: int = 0
    last_skipped: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Run:
    """The live objects of one job, built once by ``wiring.setup``."""

    config: Config  # for checkpoints and the export (the loop reads ``settings``)
    settings: LoopSettings
    accelerator: Accelerator
    directory: Path
    model: torch.nn.Module  # the prepared (possibly DDP-wrapped) PretrainModel
    raw_model: PretrainModel
    optimizer: torch.optim.Optimizer
    schedules: dict[str, np.ndarray]
    stream: TrainStream
    counters: Counters = field(default_factory=Counters)
    monitor: KNNMonitor | None = None
    stop_reason: str | None = None
    augment: BatchAugment | None = None  # data.augment_on=device: the photometric augmentations, batched
    # This session only (a resumed run started at start_step); not checkpointed, so resume stays exact.
    start_step: int = 0
    train_seconds: float = 0.0
    startup_seconds: float = 0.0  # to the end of the session's first step (workers, first forward): not a step time
    # What the shard manifests say the data is (data.shards.manifest_fingerprint); checkpointed, checked on resume.
    data_fingerprint: str | None = None


def shared_state(run: Run) -> dict[str, Any]:
    accelerator = run.accelerator
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else {}
    return {
        "format": STATE_FORMAT,
        "optimizer": run.optimizer.state_dict(),
        "scaler": scaler,
        "schedules": ckpt.schedules_to_tensors(run.schedules),
        "counters": run.counters.as_dict(),
        "config": to_dict(run.config),
        "data_fingerprint": run.data_fingerprint,
    }


def save(run: Run) -> Path:
    from ssl_hybrid.models.export import make_meta
    from ssl_hybrid.train.export import run_normalization, training_meta

    rank_state = {"rng": rng.capture(), "stream": run.stream.state_dict()}
    return ckpt.save_checkpoint(
        run.directory,
        run.counters.step,
        run.raw_model,
        shared_state(run),
        rank_state,
        run.config,
        make_meta(run.raw_model.backbone, training_meta(run.config, run_normalization(run))),
        run.accelerator,
    )


def resume(run: Run, path: Path, loaded: dict[str, Any]) -> None:
    ckpt.load_model_state(run.raw_model, loaded["model"], path)
    state = loaded["state"]
    run.optimizer.load_state_dict(state["optimizer"])
    if run.accelerator.scaler is not None and state["scaler"]:
        run.accelerator.scaler.load_state_dict(state["scaler"])
    for name, values in state["schedules"].items():
        if not np.array_equal(values.numpy(), run.schedules[name]):
            raise ckpt.CheckpointError(f"{path}: schedule '{name}' differs from this config's")
    run.counters = Counters(**state["counters"])
    run.stream.load_state_dict(loaded["rank"]["stream"])
    rng.restore(loaded["rank"]["rng"])
    log.info("resumed from %s (step %d of %d)", path, run.counters.step, run.settings.steps)
