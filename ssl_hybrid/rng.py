"""The process-wide RNGs (python ``random``, numpy's legacy global, torch CPU, CUDA): capture and restore.

Checkpoints save each rank's ``capture()`` (resume continues the same draws); the data stream and the
trainer's monitors run seeded work inside ``preserved()`` so that the training draws do not move.
A captured state holds only what ``torch.load(weights_only=True)`` reads: tensors, numbers, strings,
tuples, lists and dicts (numpy's key array as an int64 tensor).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import torch


def capture(cuda: bool = True) -> dict[str, Any]:
    """The current states; ``cuda=False`` leaves the CUDA generators out (they are then not restored)."""
    # the legacy global generator is an MT19937, whose state is this 5-tuple (numpy's stubs pick the dict overload)
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if cuda and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Set the RNGs to a ``capture()``, also one that went through ``torch.save`` / ``torch.load``."""
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved(cuda: bool = True) -> Iterator[None]:
    """Whatever the block draws or seeds, the RNGs are back where they were afterwards."""
    state = capture(cuda)
    try:
        yield
    finally:
        restore(state)


def _as_tuples(value: Any) -> Any:
    """torch.load returns lists where random.setstate wants tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value
