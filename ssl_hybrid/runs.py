"""The run-directory convention shared by every job.

``<train.output_dir>/<name>/`` holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON
object per logged step), ``checkpoints/step_<8-digit step>/`` (complete ones only) and, at the end,
the model folder ``model/`` (``ssl_hybrid.models.export``).

A run folder belongs to one run (HF Trainer's ``overwrite_output_dir`` and Composer's ``save_overwrite`` are the
models): its name stays one folder inside the output folder (``config.run_dir``), one process writes it at a time
(:func:`claim`, an advisory lock ``<output_dir>/.<name>.lock``), ``--fresh`` deletes only a folder that is a run
(:func:`start_fresh`), and nothing is deleted before its replacement is complete (:func:`replace_dir`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import yaml

from ssl_hybrid.config import Config, run_dir, write_config
from ssl_hybrid.errors import UserError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
# A folder renamed aside while its replacement is renamed in: ".<name>.replaced-<8 hex>".
_REPLACED = re.compile(r"\.(.+)\.replaced-[0-9a-f]{8}")

log = logging.getLogger(__name__)


class RunInUseError(UserError):
    """Another process holds the run folder."""


def prepare_run_dir(config: Config) -> Path:
    """Create the run directory and write the resolved config. Call only after validation passed."""
    directory = run_dir(config)
    try:
        (directory / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
        write_config(config, directory)
    except OSError as err:  # read-only, not ours, a file in the way, full: before any training time is spent
        raise unwritable(directory, err) from None
    return directory


def unwritable(directory: Path, err: OSError) -> UserError:
    return UserError(
        f"{directory}: cannot write the run directory ({err.strerror or err}); choose a writable train.output_dir"
    )


# ---------------------------------------------------------------------------------------------
# One writer per run folder, and --fresh
# ---------------------------------------------------------------------------------------------

_held: dict[str, Any] = {}  # lock path -> its FileLock, so that one process may claim a folder it holds again


def lock_path(directory: Path) -> Path:
    """Next to the run folder, not in it: --fresh deletes the folder while the lock stays held."""
    return directory.parent / f".{directory.name}.lock"


@contextlib.contextmanager
def claim(directory: Path) -> Iterator[Path]:
    """Hold the run folder's advisory lock for the ``with`` block; refuse at once (RunInUseError, one line)
    when another process holds it. The OS drops the lock when its holder dies (``flock``), so a killed run
    leaves nothing to clean up. Re-entrant within one process (quickstart holds it around pretraining).

    Call it on the main process only: under torchrun the other ranks follow the main process's decision."""
    from filelock import FileLock, Timeout

    path = lock_path(Path(directory))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _held.setdefault(str(path.resolve()), FileLock(path))
        lock.acquire(timeout=0)
    except Timeout:
        raise RunInUseError(
            f"{directory}: in use by another ssl-hybrid process (it holds {path}); wait for it to "
            "end, or choose another name= or train.output_dir="
        ) from None
    except OSError as err:
        raise unwritable(Path(directory), err) from None
    try:
        yield Path(directory)
    finally:
        lock.release()


def not_a_run(directory: Path) -> str | None:
    """Why ``directory`` is not a run folder of this tool (None when it is one, or is an empty folder).

    A run writes its ``config.yaml`` before anything else, so every run folder has one: a mapping with the
    ``name`` and ``train`` groups of a config. Anything else may be the user's and is not ours to delete."""
    if directory.is_symlink():
        return "is a symbolic link"
    if not directory.is_dir():
        return "is not a folder"
    if not any(directory.iterdir()):
        return None
    try:
        saved = yaml.safe_load((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"has no {CONFIG_FILE}"
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        return f"has an unreadable {CONFIG_FILE} ({type(err).__name__})"
    if not isinstance(saved, dict) or not {"name", "train"} <= set(saved):
        return f"has a {CONFIG_FILE} that is not an ssl-hybrid config"
    return None


def start_fresh(directory: Path) -> None:
    """``--fresh``: delete the run folder so that the run starts over (nothing when it does not exist).

    Call it only (1) on the main process: under torchrun the other ranks must not delete; (2) while holding
    :func:`claim`; (3) after the new run's config, model and data have been built and validated, so that a
    typo fails before the old run is lost. Refuses (UserError, one line) a folder :func:`not_a_run` rejects.
    The folder is renamed aside first, so a crash leaves it either whole or gone from its place."""
    if not directory.exists() and not directory.is_symlink():
        return
    why = not_a_run(directory)
    if why:
        raise UserError(
            f"{directory}: --fresh deletes only a run folder of ssl-hybrid, and this one {why}; "
            "move it away yourself or choose another name="
        )
    trash = directory.with_name(f".{directory.name}.deleting-{secrets.token_hex(4)}")
    os.rename(directory, trash)
    shutil.rmtree(trash)
    log.info("--fresh: removed %s", directory)


# ---------------------------------------------------------------------------------------------
# Durable, complete-or-nothing folders (checkpoints, shard sets)
# ---------------------------------------------------------------------------------------------


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make the folder's entries (new files, renames) durable: without it a power cut may undo a rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Flush every file of a complete temp folder, then the folder, before it is renamed into place."""
    for path in folder.iterdir():
        fsync_file(path)
    fsync_dir(folder)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete folder ``tmp`` where ``final`` is (same file system), so that a complete copy is there
    at every moment: an existing ``final`` is renamed aside (``.<name>.replaced-*``), ``tmp`` renamed in, and only
    then is the old copy deleted; a failed rename puts the old copy back. :func:`restore_replaced` finishes the
    job after a crash between the two renames. The parent is fsynced so the rename survives a power cut."""
    old = final.with_name(f".{final.name}.replaced-{secrets.token_hex(4)}") if final.exists() else None
    if old is not None:
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def restore_replaced(parent: Path) -> None:
    """After a crash inside :func:`replace_dir`: put an old copy back where nothing replaced it, else delete it."""
    for entry in parent.iterdir() if parent.is_dir() else []:
        match = _REPLACED.fullmatch(entry.name)
        if match and entry.is_dir():
            final = parent / match.group(1)
            if final.exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.rename(entry, final)
                log.warning("restored %s (a crash interrupted its replacement)", final)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than crash the writer
    return value


def append_metrics(directory: Path, record: dict[str, Any]) -> None:
    """Append one JSON object to metrics.jsonl (one line, flushed)."""
    line = json.dumps({k: _jsonable(v) for k, v in record.items()}, sort_keys=False)
    with open(directory / METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def read_metrics(directory: Path) -> list[dict[str, Any]]:
    path = Path(directory) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp file name beside ``path`` for a writer that takes a name (np.savez, savefig, an ONNX export):
    renamed onto ``path`` when the block completes, removed when it fails, so a crash never leaves half a file.
    It keeps ``path``'s suffix (writers pick the format from it) and gets the permissions of a plain ``open()``
    (mkstemp's 0600 would hide results and manifests from the user's group and other jobs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, write: Callable[[TextIO], object], newline: str | None = None) -> Path:
    """Write a text file through :func:`atomic_path`; ``write(handle)`` writes the content."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline=newline) as handle:
        write(handle)
    return path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """JSON through :func:`write_text_atomic` (``--out`` files, manifests, meta.json)."""

    def write(handle: TextIO) -> None:
        json.dump(payload, handle, indent=2, default=_jsonable)
        handle.write("\n")

    return write_text_atomic(path, write)
