"""``machine_info()``: the one description of the machine a measurement ran on (every benchmark's ``"machine"``).

Keys, always: ``platform``, ``processor``, ``python``, ``cpu_count``, ``load_average`` (1/5/15 min, None where
the OS has none), ``cpu_steal`` (the share of CPU time the hypervisor gave to other guests over a short
window, from ``/proc/stat``; None where there is no such file). A virtual machine's steal can reach 60% for
minutes (seen on the 2-core development VM), which slows every timing by the same factor: a benchmark
figure means little without it. With a ``device`` (the default ``"cpu"``) also ``torch``, ``threads`` (torch intra-op
threads now), ``device``, ``cuda`` (the CUDA version torch was built with, None for CPU builds) and ``gpu`` (the GPU
measured on, None on a CPU); on a CUDA device also ``cudnn``, ``gpu_memory_gib``, ``compute_capability`` and
``bf16``. ``packages`` adds each named package's ``__version__`` under its name.

Light on purpose: torch is imported only when a device is asked for (``device=None`` for a torch-free caller
such as the CLI start-up benchmark).
"""

from __future__ import annotations

import importlib
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def machine_info(device: str | None = "cpu", packages: Sequence[str] = ()) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cpu_steal": cpu_steal(),
    }
    if device is not None:
        info.update(_torch_info(str(device)))
    for name in packages:
        info[name] = getattr(importlib.import_module(name), "__version__", None)
    return info


PROC_STAT = Path("/proc/stat")
STEAL_WINDOW_S = 0.5


def cpu_steal(window_s: float = STEAL_WINDOW_S, stat: Path = PROC_STAT) -> float | None:
    """Share (0-1) of all CPU time in ``window_s`` that was stolen by the hypervisor; None without /proc/stat."""
    before = _cpu_times(stat)
    if before is None:
        return None
    time.sleep(window_s)
    after = _cpu_times(stat)
    if after is None:
        return None
    deltas = [b - a for a, b in zip(before, after)]
    total = sum(deltas)
    return round(deltas[STEAL_FIELD] / total, 3) if total > 0 else 0.0


STEAL_FIELD = 7  # /proc/stat "cpu" fields: user nice system idle iowait irq softirq steal guest guest_nice


def _cpu_times(stat: Path) -> list[int] | None:
    """The aggregate ``cpu`` line's first eight counters (guest time is already inside user), or None."""
    try:
        first = stat.read_text(encoding="ascii").splitlines()[0].split()
    except (OSError, IndexError, UnicodeDecodeError):
        return None
    if first[:1] != ["cpu"] or len(first) < STEAL_FIELD + 2:
        return None
    return [int(x) for x in first[1 : STEAL_FIELD + 2]]


def _torch_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            cudnn=torch.backends.cudnn.version(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(),
        )
    return info


__all__ = ["cpu_steal", "machine_info"]
