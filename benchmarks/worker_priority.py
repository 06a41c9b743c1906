"""The quickstart recipe's full training loop with its data workers at normal priority (``data.worker_nice=0``)
against low priority (``data.worker_nice=19``, what ``-1`` = auto picks without a GPU), interleaved repeats,
side by side in one run. Writes ``benchmarks/results/worker_priority.json``.

    python benchmarks/worker_priority.py                # about 5 minutes on the 2-core VM

Why it matters: on a CPU trainer the workers decode and augment on the cores the training step's compute threads
use, and those threads wait for each other, so a worker preempting one of them stalls the whole step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from bench_train import time_full_loop  # sibling script: benchmarks/ is sys.path[0]

from ssl_hybrid.config import REPO_ROOT, load_config
from ssl_hybrid.machine import machine_info

SETTINGS = {"normal": 0, "low": 19}


def loop_config(args: argparse.Namespace, workdir: Path, name: str, nice: int):
    overrides = [f"train.steps={args.warmup + args.steps}", f"train.output_dir={workdir}", f"name={name}",
                 "train.log_every=1", "train.checkpoint_every=0", "train.knn_every=0", "data.val=''",
                 f"data.worker_nice={nice}"]
    return load_config(args.recipe, overrides)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO_ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=15, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each setting")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "worker_priority.json"))
    args = parser.parse_args(argv)
    samples: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="worker_priority_") as tmp:
        for repeat in range(args.repeats):
            for name, nice in SETTINGS.items():
                config = loop_config(args, Path(tmp), f"{name}{repeat}", nice)
                samples[name].append(time_full_loop(config, args.warmup))
    mean = {name: sum(r["img_per_s"] for r in runs) / len(runs) for name, runs in samples.items()}
    result = {
        "command": "python benchmarks/worker_priority.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "setup": {"recipe": os.path.relpath(args.recipe, REPO_ROOT), "model": config.model.name,
                  "batch_size": config.train.batch_size, "image_size": config.data.image_size, "num_local_views": config.data.num_local_views,
                  "local_image_size": config.data.local_image_size, "num_workers": config.data.num_workers,
                  "timed_steps": args.steps, "warmup_steps": args.warmup, "repeats": args.repeats},
        "img_per_s": mean,
        "low_vs_normal_speedup": mean["low"] / mean["normal"],
        "samples": samples,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"img/s normal {mean['normal']:.1f}, low {mean['low']:.1f}: low priority is "
          f"{result['low_vs_normal_speedup']:.2f}x")
    return result


if __name__ == "__main__":
    main()
