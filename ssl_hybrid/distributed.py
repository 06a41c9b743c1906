"""Leaving torch.distributed so that no rank aborts at exit: the one teardown every distributed entry point uses
(the trainer, the evaluators' scripts, the tests' torchrun scripts).

``destroy_process_group()`` only drops the c10d registry's reference to the group. A
``DistributedDataParallel`` wrapper (its Reducer) holds the group too, and with it gloo's worker threads
(``pt_gloo_runloop``) and socket thread (``gloo_tcp_loop``). When the wrapper is a module global, sits in a
reference cycle or stays in Accelerate's list of prepared models, the group outlives
``destroy_process_group()`` and is torn down during interpreter finalization, racing the other rank's exit:
on a loaded machine a rank then dies with "terminate called without an active exception" (SIGABRT) after its
work was done. So the wrappers are released and collected first, and the group is destroyed, and its threads
joined, while Python is fully alive.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from typing import Any

import torch


def end_distributed(accelerator: Any | None = None, destroy_group: bool = True) -> None:
    """Release what holds the process group, then destroy it (a no-op without one).

    The caller drops its own references to wrapped models first (``del model`` / ``run = None``);
    ``accelerator`` (an ``accelerate.Accelerator``) releases the models it prepared and finishes its trackers
    (``end_training`` less its group destroy). ``destroy_group=False`` leaves a group that its creator ends later
    (quickstart keeps one for pretraining and the evaluation after it).
    """
    if accelerator is not None:
        accelerator.free_memory()  # Accelerate keeps every prepared (DDP-wrapped) model in a list
        for tracker in accelerator.trackers:
            tracker.finish()
    gc.collect()  # wrappers in reference cycles hold the group until collected
    if destroy_group and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def main_process_first(local: bool = False) -> Iterator[bool]:
    """Accelerate's ``main_process_first`` (``local``: ``local_main_process_first``, once per node): the main
    process runs the block first (it gets True), the others wait and then run it (they get False). A failing main
    process still releases the others at the barrier: they run the block themselves and meet the same error,
    each with its one line, instead of waiting for a barrier that never comes. A no-op in one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield True
        return
    from ssl_hybrid.device import process_state

    state = process_state()
    if not (state.is_local_main_process if local else state.is_main_process):
        state.wait_for_everyone()
        yield False
        return
    try:
        yield True
    finally:
        state.wait_for_everyone()


def gloo_threads() -> list[str]:
    """Names of this process's live gloo threads (Linux; [] elsewhere): none may outlive ``end_distributed``."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return []
    names = []
    for task in os.listdir(tasks):
        try:
            with open(f"{tasks}/{task}/comm", encoding="utf-8") as handle:
                names.append(handle.read().strip())
        except OSError:  # the thread ended while we looked
            continue
    return sorted(name for name in names if "gloo" in name)
