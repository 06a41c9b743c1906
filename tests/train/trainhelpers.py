"""Helpers for trainer tests: a tiny but real configuration (hybrid_nano, 32 px, batch 4, the embedded
corpus) and a way to run ``ssl-hybrid pretrain`` in a subprocess (so it can be killed for real).
A uniquely named module rather than conftest.py: several test folders have a conftest."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "pets37"


def tiny_overrides(output_dir: Path, name: str = "tiny", **extra) -> list[str]:
    values = {
        "name": name, "train.output_dir": str(output_dir), "data.train": str(CORPUS),
        "data.image_size": 32, "data.num_workers": 0, "data.shuffle_buffer": 16,
        "model.name": "hybrid_nano", "model.drop_path_rate": 0.1,
        "objective.dino_out_dim": 64, "objective.decoder_dim": 32, "objective.decoder_depth": 1,
        "objective.warmup_teacher_temp_steps": 2,
        "train.steps": 4, "train.batch_size": 4, "train.checkpoint_every": 2, "train.log_every": 1,
        "train.knn_every": 0,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def pretrain_env(threads: str | None = "1", env_extra: dict | None = None) -> dict:
    """The subprocess environment: ``threads`` torch/OpenMP threads, or None for the machine's default
    (what users get: OMP_NUM_THREADS unset)."""
    env = dict(os.environ, PYTHONHASHSEED="0", **(env_extra or {}))
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    return env


def start_pretrain(overrides: list[str], env_extra: dict | None = None, quiet: bool = True,
                   threads: str | None = "1", new_session: bool = False) -> subprocess.Popen:
    """Start ``ssl-hybrid pretrain`` in the background; ``new_session``: as the leader of a process group of its
    own (with its data workers), the way launchers start their jobs (see :func:`signal_when`)."""
    args = [sys.executable, "-m", "ssl_hybrid", *(["-q"] if quiet else []), "pretrain", *overrides]
    return subprocess.Popen(args, cwd=REPO, env=pretrain_env(threads, env_extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=new_session)


# Only a guard against a hung run: each wait below ends as soon as the run ends (or writes what is waited
# for), so a machine loaded by other work makes a test slower, never red. The run these tests start takes
# seconds on an idle machine; the limit is many times that on purpose.
HANG_LIMIT_S = 1200.0


def wait_pretrain(proc: subprocess.Popen, check: bool = True, timeout: float = HANG_LIMIT_S) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain failed ({proc.returncode}):\n{err[-3000:]}")
    return proc.returncode, err


def run_pretrain(overrides: list[str], env_extra: dict | None = None, check: bool = True,
                 threads: str | None = "1") -> tuple[int, str]:
    return wait_pretrain(start_pretrain(overrides, env_extra, threads=threads), check=check)


def signal_when(proc: subprocess.Popen, path: Path, signum: int, timeout: float = HANG_LIMIT_S,
                group: bool = False) -> None:
    """Send ``signum`` to ``proc`` as soon as ``path`` exists (from outside, like a user or a scheduler);
    fails if the process ended first, so the test always exercises the signal path. ``group``: to its whole
    process group, data workers included, as torchrun, SLURM, systemd, ``timeout`` and Ctrl-C do."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {path} appeared:\n"
                                 f"{proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s while the run kept running (hung?)")
        time.sleep(0.01)
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
