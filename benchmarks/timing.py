"""The one timing helper of the benchmarks: sides timed in alternation, rounding, GPU synchronization, a CLI.

Benchmarks compare sides timed back to back in one run (A, B, A, B, ...): load from other processes on a
shared machine then hits both sides alike, and ratios of medians (or bests) stay meaningful where absolute
times do not. Each ``bench_*.py`` script here declares ``add_arguments(parser)`` and
``run_benchmark(args) -> dict`` and calls :func:`main` to write its JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def time_alternating(sides: dict[str, Callable[[], Any]], iters: int, warmup: int = 0,
                     outputs: dict[str, Any] | None = None) -> dict[str, dict[str, list[float]]]:
    """Time callables in alternation (A, B, A, B, ...): ``{side: {"wall": [...], "cpu": [...]}}`` seconds.

    ``cpu`` is this process's CPU time (all threads): it barely grows when other processes compete
    for the cores, so its ratios are the more load-robust ones; ``wall`` is what a user waits.
    ``outputs``, when given, receives each side's last return value (to check the sides agree).
    """
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in sides}
    for _ in range(iters):
        for name, fn in sides.items():
            wall, cpu = time.perf_counter(), time.process_time()
            result = fn()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
            if outputs is not None:
                outputs[name] = result
    return times


def median(times: dict[str, list[float]], clock: str = "wall") -> float:
    return statistics.median(times[clock])


def significant(value: float, digits: int = 3) -> float:
    """``value`` to ``digits`` significant digits. Fixed decimals turn a small measurement into 0: a smoke-size
    step at 1% of the GEMM peak reads 0.001 on an idle machine and ``round(., 3) == 0.0`` once other work
    slows the step but not the much shorter GEMM; a positive measurement must stay positive."""
    return float(f"{value:.{digits}g}")


def rounded(times: dict[str, list[float]]) -> dict[str, list[float]]:
    return {clock: [significant(t) for t in values] for clock, values in times.items()}


def synchronized(fn: Callable[[], Any], device) -> Callable[[], Any]:
    """``fn`` followed by a CUDA synchronize on GPUs (kernels run asynchronously; the clock must wait)."""
    import torch

    if torch.device(device).type != "cuda":
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize(device)

    return run


def main(module, argv: list[str] | None = None) -> dict:
    """Parse ``module``'s options plus ``--out``, run it, print the JSON and write it to ``--out``."""
    from ssl_hybrid.errors import UserError
    from ssl_hybrid.logs import setup_logging
    from ssl_hybrid.runs import write_json_atomic

    parser = argparse.ArgumentParser(description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    parser.add_argument("--out", default=None, help="JSON file for the measurements")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only on stderr")
    args = parser.parse_args(argv)
    setup_logging(-1 if args.quiet else 0)
    try:
        result = module.run_benchmark(args)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.out), result)
    print(json.dumps(result, indent=2, default=str))
    return result
