"""CLI start-up time: `python -m ssl_hybrid --help` and `--version` side by side with `python -c "import torch"`.

Each of the three commands runs ``--runs`` times in a fresh process, interleaved (one of each per round, so
load from other jobs hits all three alike); the median wall-clock time of each is reported, and each CLI
time as a ratio to the torch import (the floor of any command that needs torch). The JSON holds measurements
only: the target (under 1 s) is in the README's benchmark table.

    python benchmarks/cli_startup.py --runs 7 --out benchmarks/results/cli_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ssl_hybrid.machine import machine_info

COMMANDS = {
    "help": [sys.executable, "-m", "ssl_hybrid", "--help"],
    "version": [sys.executable, "-m", "ssl_hybrid", "--version"],
    "import_torch": [sys.executable, "-c", "import torch"],
}


def wall_seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(runs):
        for name, command in COMMANDS.items():
            times[name].append(round(wall_seconds(command), 4))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per command (the median is reported)")
    parser.add_argument("--out", default="benchmarks/results/cli_startup.json", help="JSON result")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    times = measure(args.runs)
    median = {name: round(statistics.median(values), 3) for name, values in times.items()}
    result = {
        "command": f"python benchmarks/cli_startup.py --runs {args.runs}",
        "what": "median wall-clock seconds of a fresh process, the three commands interleaved; "
                "ratio = CLI time / `import torch` time",
        "commands": {name: " ".join(["python", *command[1:]]) for name, command in COMMANDS.items()},
        "machine": {**machine_info(device=None), "load_average_before": round(load_before, 2)},  # no torch here
        "median_s": median,
        "ratio_to_import_torch": {name: round(median[name] / median["import_torch"], 3) for name in ("help", "version")},
        "runs_s": times,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({key: result[key] for key in ("median_s", "ratio_to_import_torch")}, indent=2))


if __name__ == "__main__":
    main()
