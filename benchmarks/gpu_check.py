"""GPU check: what only a GPU can show, in one run of under 8 minutes on one GPU.

    bash benchmarks/gpu_check.sh            # full check on the GPU -> benchmarks/results/gpu/gpu_check.{json,md}
    bash benchmarks/gpu_check.sh --smoke    # every section for a few iterations on the CPU (< 1 minute)

Sections, in this order, each under a time cap (the JSON and the markdown are rewritten after every
section; a section that fails or hits its cap records its error string and keeps what it measured):

  throughput      bf16 autocast train step (fwd + CE + bwd + AdamW) of hybrid_small, resvit_small,
                  vit_small_patch16_224 and resnet50 at 224 px, batch 128; FLOP utilization against a bf16
                  GEMM timed in alternation with each model's steps
  augment         data.augment_on=device: batched photometric augmentation of a whole batch (SimCLR, DINO
                  multi-crop with 6 local views, 5-channel SimCLR) vs the bf16 train step of resvit_small at
                  224 px, batch 128, timed in alternation (goal: augmentation never slower than the step)
  masked          encoder train step with a 75% mask vs unmasked, hybrid_small and resvit_small
  fp16_overflow   the default recipe in fp16 with GradScaler; one step's loss is multiplied by 1e30 from
                  outside (a monkeypatch): the scaler must skip that step (weights unchanged, scale halved)
                  and training continue
  features        extract_features images/s under CUDA autocast vs a bare forward (and their agreement)
  pretrain        the default recipe (recipes/quickstart.yaml: resvit_tiny + multi-crop SimCLR, local crops at
                  half the size) for 4 minutes of GPU training at 224 px, batch 256, bf16 on flowers12/train
                  (the embedded corpus when flowers12 is absent); then k-NN and 1/5-shot linear probes vs the
                  same model at random init
  layout_compile  resvit_small train step NCHW vs channels_last, then torch.compile on/off at the faster
                  layout (last: compiling takes what time is left of the budget)

What the GPU machine needs: Python >= 3.10, one CUDA GPU with bf16, and from the repository root
`pip install -e .` (torch with CUDA, timm, lightly, accelerate, faiss-cpu...). Nothing is downloaded:
models start from random weights. flowers12 is looked up in ../shared/datasets, shared/datasets and
$SSL_HYBRID_DATASETS. The shell wrapper runs this file with the checkout on PYTHONPATH and, if the
process dies (a segfault, not a Python error), resumes once with the sections not yet run (--resume).
Exit status: 0 when every section is ok, 1 when any failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_sections  # noqa: E402  (the measurements; this file is the runner)

from ssl_hybrid.config import REPO_ROOT  # noqa: E402
from ssl_hybrid.errors import UserError  # noqa: E402
from ssl_hybrid.machine import machine_info  # noqa: E402
from ssl_hybrid.runs import write_json_atomic  # noqa: E402

log = logging.getLogger("gpu_check")

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results" / "gpu"
SECTION_ORDER = tuple(gpu_sections.SECTIONS)
MIN_CAP_S = 5.0  # a section with less time than this left is skipped, not started
PRETRAIN_OVERHEAD_S = 70.0  # calibration run, set-up, export and the evaluation around the timed training

# Per mode: what each section runs. Full: the GPU sizes of the issue; smoke: the same code paths, tiny.
FULL: dict[str, Any] = dict(
    bench=dict(img_size=224, batch_size=128, iters=10, warmup=3, precision="bf16", gemm_size=8192,
               compile_backend="inductor", mask_ratio=0.75),
    models=("hybrid_small", "resvit_small", "vit_small_patch16_224", "resnet50"),
    masked=("hybrid_small", "resvit_small"), variant="resvit_small", compile_note="",
    fp16=dict(model="resvit_tiny", image_size=96, batch_size=64, steps=24, inject_step=8),
    pretrain=dict(seconds=240.0, image_size=224, batch_size=256, calibration_steps=40, log_every=10,
                  shots=(1, 5), seeds=5),
    features=dict(models=("resvit_small", "hybrid_small"), images=2048, batch_size=256, image_size=224,
                  iters=3, warmup=1),
    augment=dict(local_views=6),
    caps=dict(throughput=45.0, masked=20.0, fp16_overflow=40.0, features=25.0, layout_compile=None, augment=25.0),
    budget_s=465.0)
SMOKE: dict[str, Any] = dict(
    bench=dict(img_size=32, batch_size=4, iters=2, warmup=1, precision="bf16", gemm_size=256,
               compile_backend="eager", mask_ratio=0.75),
    models=("hybrid_nano", "resvit_nano", "test_vit", "test_resnet"),  # timm's own tiny test models
    masked=("hybrid_nano", "resvit_nano"), variant="resvit_nano",
    compile_note="smoke: backend 'eager' (Dynamo tracing, no code generation); Inductor needs ~150 s on 2 CPU cores",
    fp16=dict(model="resvit_nano", image_size=32, batch_size=8, steps=10, inject_step=6),
    pretrain=dict(seconds=3.0, image_size=32, batch_size=8, calibration_steps=3, log_every=1, shots=(1, 5),
                  seeds=2, model="resvit_nano", eval_classes=6),  # decoding every test image is the slow part
    features=dict(models=("resvit_nano", "hybrid_nano"), images=16, batch_size=8, image_size=32, iters=2, warmup=1),
    # No per-section caps: the smoke run checks that every code path runs, and a wall-clock cap turns a machine
    # loaded by other work into a failure (fp16 on a CPU alone took 60-190 s); the budget only guards against a hang.
    augment=dict(local_views=2),
    caps=dict.fromkeys(("throughput", "masked", "fp16_overflow", "features", "pretrain", "layout_compile", "augment")),
    budget_s=1200.0)


@dataclass
class Plan:
    """Everything the sections need: device, folders and the settings of this mode."""

    smoke: bool
    device: str
    out_dir: Path
    work_dir: Path
    data: str
    workers: int
    bench: dict
    models: tuple
    masked: tuple
    variant: str
    compile_note: str
    fp16: dict
    pretrain: dict
    features: dict
    augment: dict = field(default_factory=dict)
    caps: dict = field(default_factory=dict)
    budget_s: float = 440.0


# ---------------------------------------------------------------------------------------- plan

def find_flowers12() -> Optional[Path]:
    roots = [os.environ.get("SSL_HYBRID_DATASETS", ""), REPO_ROOT.parent / "shared" / "datasets",
             REPO_ROOT / "shared" / "datasets"]
    return next((Path(r) / "flowers12" for r in roots if r and (Path(r) / "flowers12" / "train").is_dir()), None)


def make_plan(args: argparse.Namespace) -> Plan:
    cuda = torch.cuda.is_available()
    if not args.smoke and not cuda:
        raise UserError("no CUDA device: the full check needs a GPU (--smoke runs every section on the CPU)")
    mode = SMOKE if args.smoke else FULL
    out_dir = Path(args.out_dir) if args.out_dir else (
        Path(tempfile.mkdtemp(prefix="gpu_check_smoke_")) if args.smoke else RESULTS_DIR)
    if args.smoke and out_dir.resolve() == RESULTS_DIR.resolve():
        raise UserError(f"--smoke writes no results into {RESULTS_DIR} (they are the committed GPU numbers)")
    pretrain = dict(mode["pretrain"], seconds=args.pretrain_seconds or mode["pretrain"]["seconds"])
    caps = dict(mode["caps"], pretrain=mode["caps"].get("pretrain", pretrain["seconds"] + PRETRAIN_OVERHEAD_S))
    flowers = find_flowers12()
    data = args.data or (str(flowers) if flowers and not args.smoke else str(REPO_ROOT / "data" / "pets37"))
    return Plan(smoke=args.smoke, device="cuda" if cuda and not args.smoke else "cpu", out_dir=out_dir,
                work_dir=Path(tempfile.mkdtemp(prefix="gpu_check_work_")), data=data,
                workers=0 if args.smoke else max(1, min(12, (os.cpu_count() or 4) - 2)),
                bench=mode["bench"], models=mode["models"], masked=mode["masked"], variant=mode["variant"],
                compile_note=mode["compile_note"], fp16=mode["fp16"], pretrain=pretrain,
                features=mode["features"], augment=mode["augment"], caps=caps,
                budget_s=args.budget_s or mode["budget_s"])


def gpu_machine_info(device: str) -> dict[str, Any]:
    """ssl_hybrid.machine.machine_info plus what only this report shows: the commit and the GPU driver."""
    info = machine_info(device, packages=("timm", "accelerate"))
    info["git_commit"] = git_commit()
    if torch.device(device).type == "cuda":
        info["driver"] = command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return info


def command_output(command: list[str]) -> Optional[str]:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def git_commit() -> Optional[str]:
    return command_output(["git", "rev-parse", "--short", "HEAD"])


# ---------------------------------------------------------------------------------------- running

class SectionTimeout(BaseException):
    """Raised by SIGALRM when a section reaches its cap (a BaseException: library code that catches
    Exception must not swallow it)."""


@contextmanager
def time_cap(seconds: float):
    def expire(signum, frame):
        raise SectionTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_section(fn: Callable[[Plan, dict], None], plan: Plan, out: dict, cap: float) -> None:
    """``fn(plan, out)`` under ``cap`` seconds; ``out`` gets status ok/error/skipped and the wall time."""
    if cap < MIN_CAP_S:
        out.update(status="skipped", reason=f"{max(cap, 0):.0f} s left of the {plan.budget_s:.0f} s budget")
        return
    started = time.perf_counter()
    torch.manual_seed(0)
    try:
        with time_cap(cap):
            fn(plan, out)
        out["status"] = "ok"
    except SectionTimeout:
        out.update(status="error", error=f"stopped at its time cap of {cap:.0f} s (what it measured before is kept)")
    except Exception as err:  # one section's failure must not cost the others
        out.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])
        log.error("section failed: %s", out["error"])
    finally:
        out["wall_s"] = round(time.perf_counter() - started, 1)
        gpu_sections.release_memory()


def run_sections(result: dict, plan: Plan, names: list[str], save: Callable[[], None],
                 sections: dict[str, Callable] = gpu_sections.SECTIONS) -> None:
    """Each named section not yet in ``result`` (so a resumed run skips what is done), saving after each."""
    deadline = result["started_at"] + plan.budget_s
    for name in names:
        if name in result["sections"]:
            continue
        cap = plan.caps.get(name)
        left = deadline - time.time()
        cap = left if cap is None else min(cap, left)
        out = result["sections"][name] = {"status": "running", "cap_s": round(cap, 1)}
        save()  # a process that dies in this section leaves "running" behind: --resume reports it
        log.info("section %s (cap %.0f s)", name, cap)
        try:
            run_section(sections[name], plan, out, cap)
        finally:
            result["wall_s"] = round(time.time() - result["started_at"], 1)
            save()
        log.info("section %s: %s in %.1f s", name, out["status"], out.get("wall_s", 0.0))


def start_result(plan: Plan, argv: list[str], resume: bool) -> dict[str, Any]:
    """A new result, or with --resume the one in --out-dir (a section left "running" died with its process)."""
    path = plan.out_dir / "gpu_check.json"
    if resume and path.exists():
        import json

        result = json.loads(path.read_text(encoding="utf-8"))
        for out in result["sections"].values():
            if out.get("status") == "running":
                out.update(status="error", error="the process died during this section (see the console)")
        result["resumed"] = result.get("resumed", 0) + 1
        return result
    settings = {k: v for k, v in asdict(plan).items() if k not in ("out_dir", "work_dir")}
    return dict(check="gpu_check", smoke=plan.smoke,
                command="bash benchmarks/gpu_check.sh " + shlex.join(a for a in argv if a != "--resume"),
                started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                started_at=time.time(), machine=gpu_machine_info(plan.device), settings=settings, sections={})


def write_outputs(result: dict, out_dir: Path) -> None:
    from gpu_report import markdown

    write_json_atomic(out_dir / "gpu_check.json", result)
    tmp = out_dir / ".gpu_check.md.tmp"
    tmp.write_text(markdown(result), encoding="utf-8")
    os.replace(tmp, out_dir / "gpu_check.md")


# ---------------------------------------------------------------------------------------- entry

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bash benchmarks/gpu_check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="every section for a few iterations on the CPU, tiny models (the test suite runs this)")
    parser.add_argument("--out-dir", help=f"where gpu_check.json/.md go (default {RESULTS_DIR.relative_to(REPO_ROOT)}; "
                                          "--smoke: a new temporary folder)")
    parser.add_argument("--sections", default=",".join(SECTION_ORDER), help=f"comma-separated subset of {SECTION_ORDER}")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="seconds for all sections together (default 440 on a GPU; sections get at most "
                             "their cap and what is left)")
    parser.add_argument("--pretrain-seconds", type=float, default=0.0, help="training time of the pretrain section "
                                                                           "(default 240 on a GPU)")
    parser.add_argument("--data", help="labeled data for pretrain: a folder with train/ and test/, or a labeled "
                                       "corpus (default flowers12 when found, else data/pets37)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the sections already in --out-dir/gpu_check.json and run the others")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SECTION_ORDER))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTION_ORDER)}")
    args.names = [n for n in SECTION_ORDER if n in names]
    return args


def main(argv: Optional[list[str]] = None) -> int:
    from ssl_hybrid.logs import setup_logging

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    setup_logging(0)
    try:
        plan = make_plan(args)
    except UserError as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    if plan.device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes everywhere: let cuDNN pick its fastest kernels
    result = start_result(plan, argv, args.resume)
    try:
        run_sections(result, plan, args.names, lambda: write_outputs(result, plan.out_dir))
    finally:
        shutil.rmtree(plan.work_dir, ignore_errors=True)
    print((plan.out_dir / "gpu_check.md").read_text(encoding="utf-8"))
    print(f"gpu_check: wrote {plan.out_dir / 'gpu_check.json'} and gpu_check.md", file=sys.stderr)
    return 0 if all(out["status"] == "ok" for out in result["sections"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
