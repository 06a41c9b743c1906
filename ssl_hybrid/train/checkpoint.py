"""Atomic, resumable checkpoints: ``<run>/checkpoints/step_<8-digit step>/``.

A checkpoint is written into ``.tmp_step_<step>/``, every file and the folder fsynced, and renamed when
every file is on disk, so a ``step_*`` directory is always complete, also after a power cut (a kill -9
mid-write leaves only a temp dir, cleaned up on the next start). Saving a step that exists swaps the new copy
in before the old one is deleted (``runs.replace_dir``). A newest checkpoint that cannot be read is renamed
``step_<step>.unreadable`` (kept, never deleted) and the run resumes from the one before. It holds:

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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ssl_hybrid import runs
from ssl_hybrid.config import Config, to_dict, to_yaml
from ssl_hybrid.errors import UserError
from ssl_hybrid.models.export import CHECKPOINT_WEIGHTS_NAME, META_NAME, load_state_strict, write_meta
from ssl_hybrid.runs import CHECKPOINTS_DIR, CONFIG_FILE

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step_(\d{8})")
MODEL_FILE = CHECKPOINT_WEIGHTS_NAME
STATE_FILE = "state.pt"

# Keys that may change between the run that wrote a checkpoint and the one resuming it: they change
# how the run is observed or when it stops, never what it computes.
RESUME_MAY_DIFFER = {
    "train.max_seconds",
    "train.log_every",
    "train.knn_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_nonfinite_steps",
    "data.val",
    "data.max_skip_rate",
    "data.worker_nice",  # how the workers are scheduled, not what they compute
    "name",
    "train.output_dir",  # where the run folder is: moving or renaming it must not block a resume
}
# What the real writers raise when the disk is full or a file-size limit is hit: OSError (open, write, fsync,
# rename), RuntimeError (torch.save's zip writer), SafetensorError (safetensors).
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


class CheckpointError(UserError):
    """A checkpoint that cannot be used for this run."""


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint whose files cannot be read (truncated, corrupt): the run may fall back to an older one."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and STEP_DIR.fullmatch(p.name) and (p / MODEL_FILE).exists() and (p / STATE_FILE).exists()
    ]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial(run_dir: Path) -> None:
    """Temp dirs left by a process killed mid-save; a step killed mid-swap gets its old copy back."""
    for tmp in (Path(run_dir) / CHECKPOINTS_DIR).glob(".tmp_step_*"):
        shutil.rmtree(tmp, ignore_errors=True)
    runs.restore_replaced(Path(run_dir) / CHECKPOINTS_DIR)


def set_aside(path: Path) -> Path:
    """Rename an unreadable checkpoint out of the listing (``step_<step>.unreadable``), so that neither resume,
    evaluation nor pruning counts it; it is kept for inspection, never deleted."""
    target = path.with_name(f"{path.name}.unreadable")
    if target.exists():
        target = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
    path.rename(target)
    return target


def prune(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        log.debug("removed old checkpoint %s", old)


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    rank_state: dict[str, Any],
    config: Config,
    backbone_meta: dict[str, Any],
    accelerator=None,
) -> Path:
    """Write the step's checkpoint (every process calls this; rank 0 writes the shared files).

    Three stages (rank 0's shared files; every rank's own file; rank 0's rename into place), and after each
    every process learns whether any failed before going on, so that no process waits for one that gave up.
    A write that fails anywhere (disk full, quota, file-size limit, I/O error: whatever the writer raises,
    see WRITE_ERRORS) removes the temp dir and raises CheckpointError on every process; the newest complete
    checkpoint is untouched and stays what a re-run resumes from."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    final = folder / step_dir_name(step)
    tmp = folder / f".tmp_{step_dir_name(step)}"
    rank = accelerator.process_index if accelerator is not None else 0
    main = rank == 0

    def shared_files() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(model_state(model), str(tmp / MODEL_FILE))
        torch.save(state, tmp / STATE_FILE)
        write_meta(tmp / META_NAME, backbone_meta)
        (tmp / CONFIG_FILE).write_text(to_yaml(config), encoding="utf-8")
        for name in (MODEL_FILE, STATE_FILE, META_NAME, CONFIG_FILE):
            runs.fsync_file(tmp / name)

    def own_file() -> None:
        torch.save(rank_state, tmp / f"rank_{rank}.pt")
        runs.fsync_file(tmp / f"rank_{rank}.pt")

    def publish() -> None:
        runs.fsync_dir(tmp)
        runs.replace_dir(
            tmp, final
        )  # a step saved again (e.g. a re-run of a finished run) keeps its old copy until then
        prune(run_dir, config.train.keep_checkpoints)

    for stage in (shared_files if main else None, own_file, publish if main else None):
        failure = _attempt(stage)
        if _failed_anywhere(accelerator, failure is not None):
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            newest = latest_checkpoint(run_dir)
            why = _reason(failure) if failure is not None else "failed on another process"
            raise CheckpointError(
                f"{final}: could not write the checkpoint ({why}); nothing was replaced, the "
                f"newest complete checkpoint is {newest or 'none'}: free space and re-run to resume"
            )
    if main:
        log.info("checkpoint %s", final)
    return final


def _attempt(action) -> Exception | None:
    if action is None:
        return None
    try:
        action()
    except WRITE_ERRORS as err:
        return err
    return None


def _reason(err: Exception) -> str:
    """One line: the OS's words for an OSError, else the first line of the message, else the error's type."""
    strerror = getattr(err, "strerror", None)
    if strerror:
        return strerror
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _failed_anywhere(accelerator, failed: bool) -> bool:
    flag = torch.tensor([float(failed)], device=accelerator.device if accelerator is not None else "cpu")
    return bool(accelerator.gather(flag).max() > 0) if accelerator is not None else failed


def check_compatible(saved: dict[str, Any], config: Config, where: Path) -> None:
    """Refuse a checkpoint written under a different config (other than RESUME_MAY_DIFFER keys).

    A key the checkpoint's config lacks was added to the code after it was written; new keys default to
    what the code did before, so the checkpoint counts as written with the default."""
    current = _flatten(to_dict(config))
    recorded = _flatten(saved)
    before = {**_flatten(to_dict(Config())), **recorded}
    differ = sorted(
        k
        for k in set(current) | set(before)
        if k not in RESUME_MAY_DIFFER and not k.startswith("eval.") and current.get(k) != before.get(k)
    )
    if differ:
        shown = ", ".join(
            f"{k}: {before.get(k)!r}{'' if k in recorded else ' (not recorded: the default)'} -> {current.get(k)!r}"
            for k in differ[:4]
        )
        raise CheckpointError(
            f"{where}: written with a different config ({shown}"
            f"{', ...' if len(differ) > 4 else ''}); resume with the same recipe and overrides, "
            "or start a new run with another name= or train.output_dir="
        )


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_run_config(directory: Path, config: Config) -> None:
    """Refuse a run folder whose ``config.yaml`` (written when the run started, before any checkpoint) records
    a different config: continuing it would mix two runs in one folder (metrics, checkpoints)."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        return
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CheckpointError(
            f"{path}: unreadable ({type(err).__name__}); restore it, or start over with --fresh or another name="
        ) from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: not a run config; start over with --fresh or another name=")
    check_compatible(saved, config, path)


def check_data(saved: str | None, current: str | None, config: Config, where: Path) -> None:
    """Refuse to resume on data whose shard manifests changed under the same path (a checkpoint written
    before fingerprints were recorded has none and is not checked)."""
    if saved is not None and saved != current:
        raise CheckpointError(
            f"{where}: data.train {config.data.train} is not the data this run trained on (shard "
            f"manifest fingerprint {saved} -> {current}); restore that data, or start over with "
            "--fresh or another name="
        )


def _read(path: Path, loader):
    try:
        return loader(path)
    except Exception as err:  # truncated or corrupt files fail in many types (SafetensorError, pickle, zip, EOF...)
        raise UnreadableCheckpoint(f"{path}: unreadable ({_reason(err)})") from None


def load_checkpoint(path: Path, config: Config, rank: int = 0) -> dict[str, Any]:
    """(model weights, shared state, this rank's state), after checking the config matches. A file that
    cannot be read raises UnreadableCheckpoint; a checkpoint of another config or world size CheckpointError."""
    state = _read(path / STATE_FILE, lambda file: torch.load(file, map_location="cpu", weights_only=True))
    if not isinstance(state, dict) or "config" not in state:
        raise UnreadableCheckpoint(f"{path / STATE_FILE}: unreadable (not a checkpoint state)")
    check_compatible(state["config"], config, path)
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.exists():
        raise CheckpointError(f"{path}: no {rank_file.name}; was it written with a different number of processes?")
    return {
        "model": _read(path / MODEL_FILE, lambda file: load_file(str(file))),
        "state": state,
        "rank": _read(rank_file, lambda file: torch.load(file, map_location="cpu", weights_only=True)),
    }


def load_model_state(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """strict=True, with the missing/unexpected/mismatched keys named in the CheckpointError."""
    load_state_strict(model, weights, where, error=CheckpointError)


def schedules_to_tensors(schedules: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in schedules.items()}
