"""The one ``Accelerator`` factory and the one autocast choice, for training, evaluation, search and fine-tuning
(below ``train/`` and ``eval/``, so evaluation imports nothing from training)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState

# What each ``mixed_precision`` setting (Accelerate's names) runs matmuls and convolutions in.
PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_accelerator(mixed_precision: str = "no", **kwargs: Any) -> Accelerator:
    """An ``accelerate.Accelerator`` for this machine; ``kwargs`` go to it unchanged (trackers, DDP settings)."""
    from accelerate import Accelerator

    # Without a GPU, say cpu=True so that torchrun-launched processes form a gloo group (MULTI_CPU);
    # Accelerate otherwise treats each of them as a lone process.
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), **kwargs)


def process_state() -> PartialState:
    """Accelerate's process state (rank, world size; it creates the process group when launched with several
    processes), with the same ``cpu`` choice as ``make_accelerator``, whose Accelerator shares it."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def inference_precision(device: torch.device) -> str:
    """bf16 on GPUs that have it (fp16 otherwise); ``no`` on CPU, where autocast is mostly slower."""
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """Autocast to the ``mixed_precision`` dtype on ``device`` (no autocast for ``no``), as an Accelerator with
    that setting does: used where no Accelerator runs the forward (feature extraction)."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[mixed_precision])


def autocast_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype ``accelerator.autocast()`` runs matmuls and convolutions in (float32 when it is off)."""
    device = accelerator.device.type
    with accelerator.autocast():
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32


def sync_flags(accelerator: Accelerator, *flags: float) -> list[float]:
    """Max of each flag over every process (so all ranks take the same branch)."""
    values = torch.tensor(flags, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return values.tolist()
