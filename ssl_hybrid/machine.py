"""``machine_info()``: the one description of the machine a measurement ran on (every benchmark's ``"machine"``).

Keys, always: ``platform``, ``processor``, ``python``, ``cpu_count``, ``load_average`` (1/5/15 min, None where
the OS has none). With a ``device`` (the default ``"cpu"``) also ``torch``, ``threads`` (torch intra-op threads
now), ``device``, ``cuda`` (the CUDA version torch was built with, None for CPU builds) and ``gpu`` (the GPU
measured on, None on a CPU); on a CUDA device also ``cudnn``, ``gpu_memory_gib``, ``compute_capability`` and
``bf16``. ``packages`` adds each named package's ``__version__`` under its name.

Light on purpose: torch is imported only when a device is asked for (``device=None`` for a torch-free caller
such as the CLI start-up benchmark).
"""

from __future__ import annotations

import importlib
import os
import platform
from typing import Any, Optional, Sequence


def machine_info(device: Optional[str] = "cpu", packages: Sequence[str] = ()) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device is not None:
        info.update(_torch_info(str(device)))
    for name in packages:
        info[name] = getattr(importlib.import_module(name), "__version__", None)
    return info


def _torch_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
                            "cuda": torch.version.cuda, "gpu": None}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, cudnn=torch.backends.cudnn.version(),
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    compute_capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    return info


__all__ = ["machine_info"]
