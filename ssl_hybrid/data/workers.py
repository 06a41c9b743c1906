"""What every DataLoader worker of the package does first (``worker_init_fn``).

Launchers stop a job by signalling its whole process group: torchrun and ``accelerate launch`` forward
SIGTERM to every process they started, SLURM signals every process of the step, systemd the whole unit,
``timeout`` and Ctrl-C the terminal's process group. DataLoader workers are in that group. A worker that
dies of the signal takes the trainer's next ``next(loader)`` down with it ("DataLoader worker ... is killed
by signal") before the trainer could save, and one that runs the trainer's inherited Python handler logs a
stop it will never act on. Workers therefore ignore SIGTERM and SIGINT: the trainer alone decides (its
``StopSignal`` saves a checkpoint and exits), and its loader shuts the workers down as usual. A worker
whose trainer is killed outright still exits: torch's worker watchdog notices the parent is gone.
"""

from __future__ import annotations

import signal


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of every DataLoader in the package: leave SIGTERM/SIGINT to the trainer."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
