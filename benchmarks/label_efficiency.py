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
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ssl_hybrid.config import REPO_ROOT, load_config, run_dir
from ssl_hybrid.logs import setup_logging
from ssl_hybrid.machine import machine_info
from ssl_hybrid.runs import read_metrics, write_json_atomic

log = logging.getLogger("label_efficiency")

# Shared by every method: small images and a CPU-sized batch; no online monitor inside the budget; data
# loading in the training process so that its CPU time is part of the measured budget.
COMMON = ["data.num_workers=0", "train.checkpoint_every=0", "train.knn_every=0", "train.log_every=5",
          "data.val=", "optim.warmup_fraction=0.1", "optim.weight_decay=0.04", "optim.weight_decay_end=0.1"]

# Training for SimCLR-style objectives: two views, NT-Xent with a batch-norm projection head (lightly).
SIMCLR = ["data.views=simclr", "objective.mim_weight=0.0", "objective.dino_weight=0.0", "objective.simclr_weight=1.0",
          "model.drop_path_rate=0.0"]
# DINO that leaves the uniform solution within a short run: few prototypes, a fast teacher, a short warm-up.
DINO_FAST = ["data.views=dino", "objective.dino_out_dim=256", "objective.momentum_teacher=0.99",
             "objective.warmup_teacher_temp_steps=10"]

# method -> (display name, config overrides). The lr comes from the grid (--lrs), the same for every method.
# "ours" is the project's default design and small-budget objective (model.name's default; two-view SimCLR, as the
# committed label-efficiency results were run; the quickstart recipe adds multi-crop: "resvit_multicrop");
# the baseline is the lightly reference recipe's architecture (SimCLR on a ResNet-18).
OURS = ["model.name=resvit_tiny", *SIMCLR, "optim.transformer_lr_scale=0.3", "objective.embedding=multiscale"]


def without(overrides: list[str], key: str) -> list[str]:
    return [o for o in overrides if not o.startswith(key + "=")]


METHODS: dict[str, tuple[str, list[str]]] = {
    "ours": ("resvit_tiny SimCLR, multi-scale embedding (ours)", OURS),
    "simclr_resnet18": ("ResNet-18 SimCLR (lightly recipe)", ["model.name=resnet18", *SIMCLR]),
    # ablation levers (one change each from "ours")
    "resvit_pooled_embed": ("resvit_tiny SimCLR on the pooled feature", without(OURS, "objective.embedding")),
    "resvit_one_lr": ("resvit_tiny SimCLR, multi-scale embedding, one lr", without(OURS, "optim.transformer_lr_scale")),
    "hybrid_tiny_simclr": ("hybrid_tiny SimCLR, multi-scale embedding", [*without(OURS, "model.name"), "model.name=hybrid_tiny"]),
    "resvit_cj05": ("resvit_tiny SimCLR, multi-scale embedding, colour jitter 0.5", [*OURS, "data.simclr_color_jitter=0.5"]),
    # multi-crop: + 4 local crops of half the image size (method_config sets data.local_image_size)
    "resvit_multicrop": ("resvit_tiny multi-crop SimCLR (2 global + 4 local crops), multi-scale embedding",
                         [*OURS, "data.num_local_views=4"]),
    "resvit_dino": ("resvit_tiny DINO (fast teacher)", ["model.name=resvit_tiny", *DINO_FAST,
                    "objective.mim_weight=0.0", "objective.dino_weight=1.0", "optim.transformer_lr_scale=0.3"]),
    # the baseline given our training embedding: separates the embedding's effect from the architecture's
    "resnet18_ms_embed": ("ResNet-18 SimCLR, multi-scale embedding", ["model.name=resnet18", *SIMCLR,
                          "objective.embedding=multiscale"]),
    # the efficiency features of the one hybrid family on the default model (issue 30), each against "ours" at one
    # fixed step budget (--steps): EViT token selection, adaptive per-image compute, window / top-k attention
    "resvit_keep07": ("resvit_tiny + token selection (keep rate 0.7)", [*OURS, "model.token_keep_rate=0.7"]),
    "resvit_adaptive": ("resvit_tiny + adaptive compute (keep share 0.9)", [*OURS, "model.arch.token_keep_share=0.9"]),
    "resvit_window": ("resvit_tiny + window attention (3x3 tokens)", [*OURS, "model.attn_mode=window",
                                                                      "model.arch.window_size=3"]),
    "resvit_topk": ("resvit_tiny + top-k attention (k=9)", [*OURS, "model.attn_mode=topk", "model.arch.attn_topk=9"]),
    # the same at 224 px (14x14 tokens): 7x7 windows, k=49 keys (a quarter of the grid, as 3x3 and 9 of 6x6 above)
    "resvit_window7": ("resvit_tiny + window attention (7x7 tokens)", [*OURS, "model.attn_mode=window",
                                                                       "model.arch.window_size=7"]),
    "resvit_topk49": ("resvit_tiny + top-k attention (k=49)", [*OURS, "model.attn_mode=topk", "model.arch.attn_topk=49"]),
    # the hybrid_tiny objectives of earlier rounds
    "joint": ("hybrid_tiny joint MIM+DINO", ["model.name=hybrid_tiny", *DINO_FAST, "objective.mim_weight=1.0",
                                             "objective.dino_weight=1.0"]),
    "mim": ("hybrid_tiny MIM only", ["model.name=hybrid_tiny", "data.views=mae", "objective.mim_weight=1.0",
                                     "objective.dino_weight=0.0"]),
    "dino": ("hybrid_tiny DINO only", ["model.name=hybrid_tiny", *DINO_FAST, "objective.mim_weight=0.0",
                                       "objective.dino_weight=1.0"]),
}
DEFAULT_METHODS = ("ours", "simclr_resnet18")
# Random initializations of the architectures the methods train (only those in the run are evaluated).
RANDOM_BASELINES = {"resvit_tiny": "resvit_tiny random init", "resnet18": "ResNet-18 random init",
                    "hybrid_tiny": "hybrid_tiny random init"}
DEFAULT_LRS = "1.5e-3,3e-3,5e-3"  # per 256 images; every method gets every value
POOLINGS = ("multiscale", "default")  # headline first; both for every backbone, as the same treatment


def model_of(method: str) -> str:
    return next(o.split("=", 1)[1] for o in METHODS[method][1] if o.startswith("model.name="))


def run_name(method: str, lr: float) -> str:
    return f"{method}_lr{lr:g}"


def method_config(method: str, args: argparse.Namespace, steps: int, name: str, lr: float):
    overrides = [f"name={name}", f"train.output_dir={args.work_dir}", f"data.train={args.train_source}",
                 f"data.image_size={args.image_size}", f"data.local_image_size={args.image_size // 2}",
                 f"train.batch_size={args.batch_size}",
                 f"train.seed={args.seed}", f"train.steps={steps}", *COMMON, *METHODS[method][1], f"optim.lr={lr}"]
    return load_config(None, overrides)


def cpu_seconds() -> float:
    """CPU time of this process (data loading runs in it: num_workers=0), all threads."""
    return time.process_time()


def run_steps(method: str, args: argparse.Namespace, steps: int, name: str, lr: float) -> tuple[dict, float]:
    from ssl_hybrid.train.engine import pretrain

    config = method_config(method, args, steps=steps, name=name, lr=lr)
    shutil.rmtree(run_dir(config), ignore_errors=True)
    started = cpu_seconds()
    summary = pretrain(config)
    return summary, cpu_seconds() - started


def init_worker(args: argparse.Namespace, method: str) -> None:
    """One torch thread per job (CPU time is then a load-independent budget); one-time import/JIT costs are
    paid by a 1-step warm-up run, so they never land in a calibration."""
    setup_logging(-1 if args.jobs > 1 else 0)
    torch.set_num_threads(args.threads)
    name = f"warmup_{os.getpid()}"
    run_steps(method, args, 1, name, lr=1e-3)
    shutil.rmtree(args.work_dir / name, ignore_errors=True)


def calibrate(method: str, args: argparse.Namespace) -> float:
    """CPU seconds per training step: the difference of a short and a longer run cancels set-up costs."""
    short, long = 2, args.calibration_steps
    name = f"calibrate_{method}_{os.getpid()}"
    _, cpu_short = run_steps(method, args, short, name, lr=1e-3)
    _, cpu_long = run_steps(method, args, long, name, lr=1e-3)
    shutil.rmtree(args.work_dir / name, ignore_errors=True)
    return max(cpu_long - cpu_short, 1e-3) / (long - short)


def pretrain_job(method: str, lr: float, cpu_per_step: float, args: argparse.Namespace) -> dict:
    budget = args.minutes * 60
    steps = args.steps or max(1, int(budget / cpu_per_step))
    log.info("%s lr %g: %.2f CPU-s/step -> %d steps in %.0f CPU-s", method, lr, cpu_per_step, steps, budget)
    wall = time.perf_counter()
    summary, cpu = run_steps(method, args, steps, run_name(method, lr), lr)
    summary.update(method=method, lr=lr, cpu_seconds=cpu, wall_seconds=time.perf_counter() - wall,
                   planned_steps=steps, cpu_seconds_per_step=cpu_per_step, **loss_trace(Path(summary["run_dir"])))
    return summary


def loss_trace(directory: Path) -> dict:
    """Last logged loss terms and embedding spread; for DINO the first step its loss fell below ln(K), the
    uniform solution (None = never)."""
    rows = [r for r in read_metrics(directory) if "loss" in r]
    last = {k: round(v, 4) for k, v in rows[-1].items() if k in ("mim", "dino", "simclr", "embedding_std")} if rows else {}
    config = load_config(directory / "config.yaml") if (directory / "config.yaml").exists() else None
    below = None
    if config is not None and config.objective.dino_weight > 0:
        uniform = math.log(config.objective.dino_out_dim)
        below = next((r["step"] for r in rows if r.get("dino", uniform) < uniform), None)
    return {"last_losses": last, "dino_below_uniform_step": below}


def run_parallel(function, jobs: list[tuple], args: argparse.Namespace) -> list:
    """``function(*job)`` for every job, ``args.jobs`` processes at a time (spawned: no forked torch state)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if args.jobs <= 1:
        return [function(*job) for job in jobs]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=init_worker, initargs=(args, jobs[0][0])) as pool:
        return list(pool.map(function, *zip(*jobs)))


def labeled_sets(args: argparse.Namespace):
    """(train, test) labeled sets: a folder's train/ and test/, or a seeded 7/3 per-class split of a labeled
    corpus (the quickstart's split of the embedded corpus, which is also what pretraining reads unlabeled)."""
    from ssl_hybrid.data.labeled import align_classes, load_labeled, stratified_holdout

    if args.split_folders:
        train = load_labeled(args.data / "train")
        return train, align_classes(train, load_labeled(args.data / "test"))
    from ssl_hybrid.quickstart import TEST_FRACTION

    labeled = load_labeled(str(args.data))
    train_idx, test_idx = stratified_holdout(labeled.labels, TEST_FRACTION, args.seed)
    return labeled.subset(train_idx), labeled.subset(test_idx)


def select_lr(runs: list[dict], train_set, args: argparse.Namespace) -> dict[str, dict]:
    """Per method, the lr whose backbone has the best leave-one-out k-NN top-1 on the *train* split (labels of
    the train split only; the test split never picks a setting). Features come from the report's cache."""
    from ssl_hybrid.eval.features import features_for_spec
    from ssl_hybrid.eval.knn import leave_one_out_knn

    chosen: dict[str, dict] = {}
    for run in runs:
        _, [(features, labels)] = features_for_spec(run["run_dir"], [train_set], args.image_size, 64,
                                                    cache_dir=args.work_dir / "features", pooling=POOLINGS[0])
        run["train_loo_knn"] = leave_one_out_knn(features, labels)["top1"]
        best = chosen.get(run["method"])
        if best is None or run["train_loo_knn"] > best["train_loo_knn"]:
            chosen[run["method"]] = run
    return chosen


def evaluate(specs: dict[str, tuple[str, str]], train_set, test_set, args: argparse.Namespace,
             pooling: str, out_dir: Path) -> dict:
    from ssl_hybrid.eval.report import build_report

    names = [name for name, _ in specs.values()]
    return build_report([spec for _, spec in specs.values()], train_set, test_set, out_dir, names=names,
                        shots=args.shots, seeds=args.seeds, methods=("linear",), image_size=args.image_size,
                        batch_size=64, num_workers=1, cache_dir=args.work_dir / "features", pooling=pooling)


def summary_row(entry: dict, shots: list[int]) -> dict:
    row = {"knn_top1": round(100 * entry["knn"]["top1"], 1)}
    row.update({f"linear_{r['shots']}shot": round(100 * r["mean"], 1) for r in entry["fewshot"] if r["shots"] in shots})
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "datasets" / "flowers12",
                        help="labeled folder with train/ and test/ class sub-folders, or a labeled corpus "
                             "(e.g. data/pets37: pretraining on all of it unlabeled, evaluation on a 7/3 split)")
    parser.add_argument("--minutes", type=float, default=4.0, help="pretraining budget per run, in CPU-minutes")
    parser.add_argument("--steps", type=int, default=0,
                        help="a fixed step budget, the same for every method, instead of --minutes (no calibration)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--lrs", default=DEFAULT_LRS, help="lr grid per 256 images; every method runs every value")
    parser.add_argument("--jobs", type=int, default=1,
                        help="pretraining runs in parallel (one process and --threads threads each); "
                             "the budget is CPU time, so it does not change with the number of jobs")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calibration-steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per job; 1 makes CPU time a load-independent budget (no spin-waiting)")
    parser.add_argument("--shots", default="1,5,10")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "label_efficiency")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "label_efficiency")
    args = parser.parse_args()
    args.shots = [int(s) for s in args.shots.split(",")]
    setup_logging(0)
    torch.set_num_threads(args.threads)
    args.split_folders = (args.data / "train").is_dir() and (args.data / "test").is_dir()
    if not args.split_folders and not (args.data / "manifest.json").is_file():
        print(f"label_efficiency: {args.data} needs train/ and test/ class folders or labeled shards", file=sys.stderr)
        return 2
    args.train_source = args.data / "train" if args.split_folders else args.data
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"label_efficiency: unknown method {unknown[0]} (choose from {', '.join(METHODS)})", file=sys.stderr)
        return 2
    try:
        lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
    except ValueError:
        print(f"label_efficiency: --lrs must be comma-separated numbers, got {args.lrs!r}", file=sys.stderr)
        return 2
    if args.jobs <= 1:
        init_worker(args, methods[0])
    if args.steps:
        per_step = dict.fromkeys(methods, 0.0)
    else:
        per_step = dict(zip(methods, run_parallel(calibrate, [(m, args) for m in methods], args)))
    runs = run_parallel(pretrain_job, [(m, lr, per_step[m], args) for m in methods for lr in lrs], args)
    train_set, test_set = labeled_sets(args)
    chosen = select_lr(runs, train_set, args)
    randoms = {model_of(m) for m in methods}
    specs = {run_name(r["method"], r["lr"]): (f"{METHODS[r['method']][0]}, lr {r['lr']:g}", r["run_dir"]) for r in runs}
    specs.update({f"random_{m}": (RANDOM_BASELINES[m], f"random:{m}") for m in RANDOM_BASELINES if m in randoms})
    reports = {pooling: evaluate(specs, train_set, test_set, args, pooling,
                                 args.out_dir if pooling == POOLINGS[0] else args.out_dir / f"{pooling}_pooling")
               for pooling in POOLINGS}
    results = {key: {pooling: summary_row(reports[pooling]["entries"][i], args.shots) for pooling in POOLINGS}
               for i, key in enumerate(specs)}
    headline = [*(run_name(r["method"], r["lr"]) for r in chosen.values()), *(k for k in specs if k.startswith("random_"))]
    table = headline_table(headline, specs, results, {run_name(r['method'], r['lr']): r for r in runs}, args)
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": {**machine_info(), "threads_per_job": args.threads, "jobs": args.jobs},
        "data": str(args.data), "image_size": args.image_size, "batch_size": args.batch_size,
        "budget_minutes_per_run": None if args.steps else args.minutes, "budget_steps_per_run": args.steps or None,
        "lr_grid": lrs, "methods": methods,
        "lr_selection": "per method, best leave-one-out k-NN top-1 (k=20) on the train split (multiscale pooling)",
        "chosen_lr": {m: r["lr"] for m, r in chosen.items()},
        "pretraining": {run_name(r["method"], r["lr"]): r for r in runs},
        "results": results, "headline": headline, "table": table,
        "entries": {pooling: reports[pooling]["entries"] for pooling in POOLINGS},
    }
    write_json_atomic(args.out_dir / "label_efficiency.json", result)
    (args.out_dir / "label_efficiency.md").write_text(
        f"# Label efficiency at {f'{args.steps} steps' if args.steps else f'{args.minutes:g} CPU-minutes'} of "
        "pretraining per run\n\n"
        f"Command: `{result['command']}`\n\nData: `{args.data}` (pretraining on the train images without labels; "
        f"k-NN and k-shot linear probes on the test images), {args.image_size} px, batch {args.batch_size}, "
        f"lr grid {', '.join(f'{lr:g}' for lr in lrs)} per 256 for every method; each method's lr chosen by "
        f"leave-one-out k-NN on the train split.\n\n{table}\n![label efficiency](label_efficiency.png)\n",
        encoding="utf-8")
    print(table)
    return 0


def headline_table(headline: list[str], specs: dict, results: dict, runs: dict[str, dict],
                   args: argparse.Namespace) -> str:
    """Markdown: the chosen run of each method and the random inits under both poolings; then the whole grid."""
    cols = ["knn_top1", *(f"linear_{k}shot" for k in args.shots)]
    header = [f"{c} ({p})" for p in POOLINGS for c in cols]

    def cells(key: str) -> list[str]:
        return [f"{results[key][p].get(c, float('nan')):.1f}" for p in POOLINGS for c in cols]

    out = ["| backbone | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
    out += ["| " + " | ".join([specs[key][0], *cells(key)]) + " |" for key in headline]
    out += ["", "All runs of the grid (★ = the lr chosen by leave-one-out k-NN on the train split):", "",
            "| run | steps | train LOO k-NN | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 3)]
    for key, run in runs.items():
        name = specs[key][0] + (" ★" if key in headline else "")
        out.append("| " + " | ".join([name, str(run["step"]), f"{100 * run['train_loo_knn']:.1f}", *cells(key)]) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
