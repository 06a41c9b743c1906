"""Atomic, resumable checkpoints: ``<run>/checkpoints/step_<8-digit step>/``.

A checkpoint is written into ``.tmp_step_<step>/`` and renamed when every file is on disk, so a
``step_*`` directory is always complete (a kill -9 mid-write leaves only a temp dir, cleaned up on the
next start). It holds:

- ``model.safetensors``: student backbone (``backbone.*``), heads and EMA teacher (``teacher.*``);
- ``state.pt``: optimizer, grad scaler, schedules, counters, the resolved config (tensors and plain
  Python only, loaded with ``weights_only=True``);
- ``rank_<r>.pt``: each process's RNG states (``ssl_hybrid.rng.capture``: python, numpy, torch, cuda)
  and data-stream position;
- ``backbone.json`` + ``config.yaml``: what the evaluators need to rebuild the backbone from it.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ssl_hybrid.config import Config, to_dict, to_yaml
from ssl_hybrid.errors import UserError
from ssl_hybrid.models.export import CHECKPOINT_WEIGHTS_NAME, META_NAME, load_state_strict, write_meta
from ssl_hybrid.runs import CHECKPOINTS_DIR

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step_(\d{8})")
MODEL_FILE = CHECKPOINT_WEIGHTS_NAME
STATE_FILE = "state.pt"

# Keys that may change between the run that wrote a checkpoint and the one resuming it: they change
# how the run is observed or when it stops, never what it computes.
RESUME_MAY_DIFFER = {
    "train.max_seconds", "train.log_every", "train.knn_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.max_nonfinite_steps", "data.val", "data.max_skip_rate",
    "data.worker_nice",  # how the workers are scheduled, not what they compute
}


class CheckpointError(UserError):
    """A checkpoint that cannot be used for this run."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)
             and (p / MODEL_FILE).exists() and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial(run_dir: Path) -> None:
    """Temp dirs left by a process killed mid-save."""
    for tmp in (Path(run_dir) / CHECKPOINTS_DIR).glob(".tmp_step_*"):
        shutil.rmtree(tmp, ignore_errors=True)


def prune(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        log.debug("removed old checkpoint %s", old)


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                    rank_state: dict[str, Any], config: Config, backbone_meta: dict[str, Any],
                    accelerator=None) -> Path:
    """Write the step's checkpoint (every process calls this; rank 0 writes the shared files).

    A write that fails on any process (disk full, quota, I/O error) removes the temp dir and raises
    CheckpointError on every process; the newest complete checkpoint is untouched and stays what a
    re-run resumes from."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    final = folder / step_dir_name(step)
    tmp = folder / f".tmp_{step_dir_name(step)}"
    rank = accelerator.process_index if accelerator is not None else 0
    main = rank == 0
    failure: Optional[OSError] = None
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(model_state(model), str(tmp / MODEL_FILE))
            torch.save(state, tmp / STATE_FILE)
            write_meta(tmp / META_NAME, backbone_meta)
            (tmp / "config.yaml").write_text(to_yaml(config), encoding="utf-8")
    except OSError as err:
        failure = err
    _barrier(accelerator)
    if failure is None:
        try:
            torch.save(rank_state, tmp / f"rank_{rank}.pt")
        except OSError as err:
            failure = err
    if _failed_anywhere(accelerator, failure is not None):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        newest = latest_checkpoint(run_dir)
        why = f"{failure.strerror or failure}" if failure is not None else "failed on another process"
        raise CheckpointError(f"{final}: could not write the checkpoint ({why}); nothing was replaced, the "
                              f"newest complete checkpoint is {newest or 'none'}: free space and re-run to resume")
    if main:
        if final.exists():  # the same step saved again (e.g. end right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
        prune(run_dir, config.train.keep_checkpoints)
        log.info("checkpoint %s", final)
    _barrier(accelerator)
    return final


def _failed_anywhere(accelerator, failed: bool) -> bool:
    flag = torch.tensor([float(failed)], device=accelerator.device if accelerator is not None else "cpu")
    return bool(accelerator.gather(flag).max() > 0) if accelerator is not None else failed


def _barrier(accelerator) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def check_compatible(saved: dict[str, Any], config: Config, where: Path) -> None:
    """Refuse a checkpoint written under a different config (other than RESUME_MAY_DIFFER keys).

    A key the checkpoint's config lacks was added to the code after it was written; new keys default to
    what the code did before, so the checkpoint counts as written with the default."""
    current = _flatten(to_dict(config))
    recorded = _flatten(saved)
    before = {**_flatten(to_dict(Config())), **recorded}
    differ = sorted(k for k in set(current) | set(before)
                    if k not in RESUME_MAY_DIFFER and not k.startswith("eval.") and current.get(k) != before.get(k))
    if differ:
        shown = ", ".join(f"{k}: {before.get(k)!r}{'' if k in recorded else ' (not recorded: the default)'} -> "
                          f"{current.get(k)!r}" for k in differ[:4])
        raise CheckpointError(
            f"{where}: checkpoint was written with a different config ({shown}"
            f"{', ...' if len(differ) > 4 else ''}); resume with the same recipe and overrides, "
            "or start a new run with another name= or train.output_dir=")


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_checkpoint(path: Path, config: Config, rank: int = 0) -> dict[str, Any]:
    """(model weights, shared state, this rank's state), after checking the config matches."""
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean "not our checkpoint"
        raise CheckpointError(f"{path / STATE_FILE}: unreadable checkpoint state ({err})") from None
    check_compatible(state["config"], config, path)
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.exists():
        raise CheckpointError(f"{path}: no {rank_file.name}; was it written with a different number of processes?")
    return {"model": load_file(str(path / MODEL_FILE)), "state": state,
            "rank": torch.load(rank_file, map_location="cpu", weights_only=True)}


def load_model_state(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """strict=True, with the missing/unexpected/mismatched keys named in the CheckpointError."""
    load_state_strict(model, weights, where, error=CheckpointError)


def schedules_to_tensors(schedules: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in schedules.items()}
