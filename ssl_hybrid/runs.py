"""The run-directory convention shared by every job.

``<train.output_dir>/<name>/`` holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON
object per logged step), ``checkpoints/step_<8-digit step>/`` (complete ones only) and, at the end,
the model folder ``model/`` (``ssl_hybrid.models.export``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ssl_hybrid.config import Config, run_dir, write_config
from ssl_hybrid.errors import UserError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"


def prepare_run_dir(config: Config) -> Path:
    """Create the run directory and write the resolved config. Call only after validation passed."""
    directory = run_dir(config)
    try:
        (directory / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
        write_config(config, directory)
    except OSError as err:  # read-only, not ours, a file in the way, full: before any training time is spent
        raise UserError(f"{directory}: cannot write the run directory ({err.strerror or err}); "
                        "choose a writable train.output_dir") from None
    return directory


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


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """Write JSON through a temp file + rename, so a crash never leaves half a file (used by --out)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, default=_jsonable)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
