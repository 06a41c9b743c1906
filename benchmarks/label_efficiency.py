"""Label-efficiency benchmark: which pretraining gives the best few-label features at one fixed CPU budget?

Every method pretrains on the *train* images of a labeled folder with the labels ignored, for the same
budget of CPU time (one torch thread, data loading in-process, so the budget does not depend on what else
runs on the machine). Then all
backbones, plus random initializations, are evaluated with the project's own evaluators on cached
features: k-NN top-1 (DINO protocol, k=20) on the full train split, and 1/5/10-shot linear probes, mean ±
std over seeded splits, on the test split.

The lr schedules are defined in steps, so each method first measures its CPU seconds per step (the
difference of a 2-step and a 6-step run, which cancels set-up costs; not counted in the budget); it then
trains for the steps that fit in the budget. Writes JSON + markdown (+ the report's plot and grids).

    python benchmarks/label_efficiency.py --data ../shared/datasets/flowers12 --minutes 4 \
        --out-dir benchmarks/results/label_efficiency
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ssl_hybrid.config import REPO_ROOT, load_config, run_dir
from ssl_hybrid.logs import setup_logging
from ssl_hybrid.runs import read_metrics, write_json_atomic

log = logging.getLogger("label_efficiency")

# Shared by every method: small images and a CPU-sized batch; no online monitor inside the budget; data
# loading in the training process so that its CPU time is part of the measured budget.
COMMON = ["data.num_workers=0", "train.checkpoint_every=0", "train.knn_every=0", "train.log_every=5",
          "data.val=", "optim.warmup_fraction=0.1", "optim.weight_decay=0.04", "optim.weight_decay_end=0.1"]

# method -> (display name, config overrides). Joint/MIM/DINO use our hybrid_tiny; the baseline is the
# lightly reference recipe's architecture (SimCLR on a ResNet-18, lightly NT-Xent + projection head).
METHODS: dict[str, tuple[str, list[str]]] = {
    "joint": ("hybrid_tiny joint MIM+DINO", [
        "model.name=hybrid_tiny", "data.views=dino", "objective.mim_weight=1.0", "objective.dino_weight=1.0",
        "objective.dino_out_dim=256", "objective.momentum_teacher=0.99", "optim.lr=5e-3"]),
    "mim": ("hybrid_tiny MIM only", [
        "model.name=hybrid_tiny", "data.views=mae", "objective.mim_weight=1.0", "objective.dino_weight=0.0",
        "optim.lr=5e-3"]),
    "dino": ("hybrid_tiny DINO only", [
        "model.name=hybrid_tiny", "data.views=dino", "objective.mim_weight=0.0", "objective.dino_weight=1.0",
        "objective.dino_out_dim=256", "objective.momentum_teacher=0.99", "optim.lr=5e-3"]),
    "simclr_resnet18": ("ResNet-18 SimCLR (lightly recipe)", [
        "model.name=resnet18", "data.views=simclr", "objective.mim_weight=0.0", "objective.dino_weight=0.0",
        "objective.simclr_weight=1.0", "optim.lr=5e-3", "model.drop_path_rate=0.0"]),
}
RANDOM_BASELINES = {"random_hybrid_tiny": ("hybrid_tiny random init", "random:hybrid_tiny"),
                    "random_resnet18": ("ResNet-18 random init", "random:resnet18")}


def method_config(method: str, args: argparse.Namespace, steps: int, name: str):
    overrides = [f"name={name}", f"train.output_dir={args.work_dir}", f"data.train={args.data / 'train'}",
                 f"data.image_size={args.image_size}", f"train.batch_size={args.batch_size}",
                 f"train.seed={args.seed}", f"train.steps={steps}", *COMMON, *METHODS[method][1]]
    return load_config(None, overrides)


def cpu_seconds() -> float:
    """CPU time of this process (data loading runs in it: num_workers=0), all threads."""
    return time.process_time()


def run_steps(method: str, args: argparse.Namespace, steps: int, name: str) -> tuple[dict, float]:
    from ssl_hybrid.train.loop import pretrain

    config = method_config(method, args, steps=steps, name=name)
    shutil.rmtree(run_dir(config), ignore_errors=True)
    started = cpu_seconds()
    summary = pretrain(config)
    return summary, cpu_seconds() - started


def calibrate(method: str, args: argparse.Namespace) -> float:
    """CPU seconds per training step: the difference of a short and a longer run cancels set-up costs."""
    short, long = 2, args.calibration_steps
    _, cpu_short = run_steps(method, args, short, f"calibrate_{method}")
    _, cpu_long = run_steps(method, args, long, f"calibrate_{method}")
    shutil.rmtree(args.work_dir / f"calibrate_{method}", ignore_errors=True)
    return max(cpu_long - cpu_short, 1e-3) / (long - short)


def pretrain_method(method: str, args: argparse.Namespace) -> dict:
    cpu_per_step = calibrate(method, args)
    budget = args.minutes * 60
    steps = max(1, int(budget / cpu_per_step))
    log.info("%s: %.2f CPU-s/step -> %d steps in %.0f CPU-s", method, cpu_per_step, steps, budget)
    wall = time.perf_counter()
    summary, cpu = run_steps(method, args, steps, method)
    summary.update(cpu_seconds=cpu, wall_seconds=time.perf_counter() - wall, planned_steps=steps,
                   cpu_seconds_per_step=cpu_per_step)
    return summary


def evaluate(specs: dict[str, tuple[str, str]], args: argparse.Namespace) -> dict:
    from ssl_hybrid.data.labeled import align_classes, load_labeled
    from ssl_hybrid.eval.report import build_report

    train_set = load_labeled(args.data / "train")
    test_set = align_classes(train_set, load_labeled(args.data / "test"))
    names = [name for name, _ in specs.values()]
    return build_report([spec for _, spec in specs.values()], train_set, test_set, args.out_dir, names=names,
                        shots=args.shots, seeds=args.seeds, methods=("linear",), image_size=args.image_size,
                        batch_size=64, num_workers=1, cache_dir=None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "datasets" / "flowers12",
                        help="labeled folder with train/ and test/ class sub-folders")
    parser.add_argument("--minutes", type=float, default=4.0, help="pretraining budget per method, in CPU-minutes")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of methods")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calibration-steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 makes CPU time a load-independent budget (no spin-waiting)")
    parser.add_argument("--shots", default="1,5,10")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "label_efficiency")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "label_efficiency")
    args = parser.parse_args()
    args.shots = [int(s) for s in args.shots.split(",")]
    setup_logging(0)
    torch.set_num_threads(args.threads)
    if not (args.data / "train").is_dir() or not (args.data / "test").is_dir():
        print(f"label_efficiency: {args.data} needs train/ and test/ class folders", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"label_efficiency: unknown method {unknown[0]} (choose from {', '.join(METHODS)})", file=sys.stderr)
        return 2
    run_steps(methods[0], args, 1, "warmup")  # one-time import/JIT costs must not land in a calibration
    shutil.rmtree(args.work_dir / "warmup", ignore_errors=True)
    pretraining = {method: pretrain_method(method, args) for method in methods}
    specs = {m: (METHODS[m][0], str(Path(pretraining[m]["run_dir"]))) for m in methods}
    specs.update(RANDOM_BASELINES)
    report = evaluate(specs, args)
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "data": str(args.data), "image_size": args.image_size, "batch_size": args.batch_size,
        "budget_minutes_per_method": args.minutes, "pretraining": pretraining,
        "table": report["table"], "entries": report["entries"],
    }
    write_json_atomic(args.out_dir / "label_efficiency.json", result)
    (args.out_dir / "label_efficiency.md").write_text(
        f"# Label efficiency at {args.minutes:g} CPU-minutes of pretraining per method\n\n"
        f"Command: `{result['command']}`\n\nData: `{args.data}` (pretraining on train/ without labels; "
        f"k-NN and k-shot linear probes on test/), {args.image_size} px, batch {args.batch_size}.\n\n"
        f"{report['table']}\n![label efficiency](label_efficiency.png)\n", encoding="utf-8")
    print(report["table"])
    print(json.dumps({m: {k: s[k] for k in ("step", "planned_steps", "cpu_seconds", "wall_seconds")}
                      for m, s in pretraining.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
