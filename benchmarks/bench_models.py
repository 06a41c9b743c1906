"""``python benchmarks/bench_models.py``: train-step and inference throughput of the backbones, side by side.

Three measurements, each written to one JSON:

* ``models``: per model, a train step (forward + cross-entropy + backward + AdamW) at ``--img-size``
  and ``--batch-size``: images/s, GFLOPs per image (FlopCounterMode, fwd+bwd), and the achieved
  FLOP/s divided by a GEMM peak measured right before and after that model (the machine is shared,
  so the peak is taken under the same load as the step it is compared with);
* ``masked``: ``hybrid_small`` encoder train step with a 75% mask vs without (loss on the fused
  tokens; a decoder belongs to the objective and is left out of both sides);
* ``selection``: ``hybrid_small`` inference with no token selection, fixed keep rate, adaptive share;
* ``layout`` (not run by default: compiling is slow on CPUs): the ``--variant`` train step in NCHW vs
  ``channels_last``, then ``torch.compile`` on vs off at the faster layout.

``--device cuda --precision bf16`` runs the same steps on a GPU under autocast, each timed call ending in
a ``torch.cuda.synchronize``, with the GEMM peak taken in the same dtype (``--gemm-size`` 8192 there:
a 1024 GEMM is launch-bound on a GPU). The GPU check (``benchmarks/gpu_check.sh``) calls these functions.

Ratios compare sides timed in alternation (A, B, A, B, ...) and use medians, so load from other
processes hits both sides alike. The JSON holds measurements only: the targets they are judged against
are in the README's benchmark table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import time
from typing import Any, Callable

from timing import median, rounded, significant, synchronized, time_alternating

from ssl_hybrid.machine import machine_info

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("hybrid_nano,hybrid_tiny,hybrid_small,hybrid_base,vit_tiny_patch16_224,vit_small_patch16_224,"
                  "resnet18,resnet50,convnext_atto")
DEFAULT_SECTIONS = ("models", "masked", "selection")
SECTIONS = (*DEFAULT_SECTIONS, "layout")
PRECISIONS = ("fp32", "bf16", "fp16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated timm model names for the table")
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS), help=f"which measurements to run: {SECTIONS}")
    parser.add_argument("--device", default="cpu", help="torch device for every section (cpu, cuda, cuda:1)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="autocast dtype of the forward passes (the GEMM peak is measured in the same dtype)")
    parser.add_argument("--gemm-size", type=int, default=1024, help="side of the square GEMM that gives the peak")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the layout section ('eager' only traces: a cheap smoke test)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per side (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument("--img-size", type=int, default=224, help="square input size (multiple of 16)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--extra-threads", default="",
                        help="comma-separated thread counts to repeat the masked/selection ratios at (e.g. 1): "
                             "shows how much load from other processes, not the model, moves the ratios")
    parser.add_argument("--variant", default="hybrid_small", help="hybrid model for the masked and selection sections")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="hidden share for the masked step")
    parser.add_argument("--keep-rate", type=float, default=0.7, help="fixed token selection keep rate (EViT)")
    parser.add_argument("--keep-share", type=float, default=0.8,
                        help="adaptive token selection: share of class-token attention to keep")


GEMM_SIZE = 1024
GEMM_REPEATS = 4


def autocast_for(device, precision: str) -> Callable[[], Any]:
    """A factory of the autocast context for ``precision`` (fp32: none) on ``device``'s type."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return lambda: torch.autocast(torch.device(device).type, dtype=dtype)


def gemm_fn(size: int = GEMM_SIZE, precision: str = "fp32", device="cpu") -> tuple[Callable[[], None], float]:
    """A square matmul workload in ``precision`` and its FLOPs: the practical ceiling for dense layers here."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))

    def run() -> None:
        for _ in range(GEMM_REPEATS):
            torch.mm(a, b)

    return synchronized(run, device), 2.0 * size ** 3 * GEMM_REPEATS


# ---------------------------------------------------------------------------------------- sections

def _train_step_fn(model, x, labels, optimizer, autocast=contextlib.nullcontext) -> Callable[[], None]:
    import torch.nn.functional as F

    def step() -> None:
        with autocast():  # the forward and the loss only: backward ops follow the forward's dtypes
            loss = F.cross_entropy(model(x).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _adamw(model):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, foreach=True)


def _classifier(name: str, args):
    """``name`` with a 1000-class head at ``--img-size`` on ``--device``, in train mode."""
    from ssl_hybrid.models.factory import create_backbone

    return create_backbone(name, args.img_size, num_classes=1000).to(args.device).train()


def _inputs(args) -> tuple[Any, Any]:
    import torch

    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    return x, torch.randint(0, 1000, (args.batch_size,), device=args.device)


def bench_models(names: list[str], args) -> list[dict[str, Any]]:
    """Train step per model, timed in alternation with the GEMM workload (peak under the same load)."""
    from ssl_hybrid.models.flops import count_flops

    rows = []
    x, labels = _inputs(args)
    gemm, gemm_flops = gemm_fn(args.gemm_size, args.precision, args.device)
    autocast = autocast_for(args.device, args.precision)
    for name in names:
        log.info("train step: %s", name)
        model = _classifier(name, args)
        flops = count_flops(model, x, train_step=True)
        step = synchronized(_train_step_fn(model, x, labels, _adamw(model), autocast), args.device)
        times = time_alternating({"step": step, "gemm": gemm}, args.iters, args.warmup)
        step_s, gemm_s = median(times["step"]), median(times["gemm"])
        utilization_cpu = (flops / median(times["step"], "cpu")) / (gemm_flops / median(times["gemm"], "cpu"))
        rows.append(dict(
            model=name, params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            img_per_s=significant(args.batch_size / step_s, 4), step_s=significant(step_s),
            train_gflops_per_img=significant(flops / args.batch_size / 1e9),
            achieved_gflop_per_s=significant(flops / step_s / 1e9),
            gemm_peak_gflop_per_s=significant(gemm_flops / gemm_s / 1e9),
            utilization=significant((flops / step_s) / (gemm_flops / gemm_s)),
            utilization_cpu_time=significant(utilization_cpu),
            times_s=rounded(times["step"]), gemm_times_s=rounded(times["gemm"])))
        log.info("%s", rows[-1])
        del model
    return rows


def bench_masked(args) -> dict[str, Any]:
    import torch

    from ssl_hybrid.models.factory import create_backbone
    from ssl_hybrid.models.flops import count_flops
    from ssl_hybrid.models.masking import random_grid_mask

    model = create_backbone(args.variant, args.img_size).to(args.device).train()
    optimizer = _adamw(model)
    autocast = autocast_for(args.device, args.precision)
    grid = args.img_size // 16
    x, _ = _inputs(args)
    mask = random_grid_mask(args.batch_size, grid, grid, args.mask_ratio,
                            generator=torch.Generator().manual_seed(0)).to(args.device)

    def encoder_step(masked: bool) -> Callable[[], None]:
        def step() -> None:
            with autocast():
                out = model.forward_masked(x, mask)["fused"] if masked else model.forward_features(x)
            out.float().pow(2).mean().backward()  # stand-in for the objective; the decoder is not the backbone's
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return synchronized(step, args.device)

    flops = {
        "unmasked": count_flops(model, x, train_step=True, forward_fn=lambda m, i: m.forward_features(i)),
        "masked": count_flops(model, x, train_step=True, forward_fn=lambda m, i: m.forward_masked(i, mask)["fused"]),
    }
    times = time_alternating({"unmasked": encoder_step(False), "masked": encoder_step(True)}, args.iters, args.warmup)
    return dict(
        model=args.variant, mask_ratio=args.mask_ratio, precision=args.precision,
        img_per_s={side: round(args.batch_size / median(t), 3) for side, t in times.items()},
        times_s={side: rounded(t) for side, t in times.items()},
        train_gflops_per_img={side: round(f / args.batch_size / 1e9, 3) for side, f in flops.items()},
        speedup=round(median(times["unmasked"]) / median(times["masked"]), 3),
        speedup_cpu_time=round(median(times["unmasked"], "cpu") / median(times["masked"], "cpu"), 3),
        flops_ratio=round(flops["unmasked"] / flops["masked"], 3))


def bench_layout(args) -> dict[str, Any]:
    """``--variant`` train step in NCHW vs ``channels_last`` (eager), in alternation."""
    import torch

    autocast = autocast_for(args.device, args.precision)
    x, labels = _inputs(args)
    first = _classifier(args.variant, args)
    models = {"channels_first": first, "channels_last": copy.deepcopy(first).to(memory_format=torch.channels_last)}
    inputs = {"channels_first": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
    steps = {layout: synchronized(_train_step_fn(model, inputs[layout], labels, _adamw(model), autocast), args.device)
             for layout, model in models.items()}
    times = time_alternating(steps, args.iters, args.warmup)
    img_per_s = {layout: round(args.batch_size / median(t), 3) for layout, t in times.items()}
    return dict(model=args.variant, precision=args.precision, img_per_s=img_per_s,
                times_s={layout: rounded(t) for layout, t in times.items()},
                channels_last_speedup=round(median(times["channels_first"]) / median(times["channels_last"]), 3),
                faster=max(img_per_s, key=img_per_s.get))


def bench_compile(args, layout: str = "channels_first") -> dict[str, Any]:
    """``--variant`` train step eager vs ``torch.compile`` (``--compile-backend``) in ``layout``; the first
    compiled step (tracing + code generation) is timed on its own as ``compile_s``."""
    import torch

    autocast = autocast_for(args.device, args.precision)
    x, labels = _inputs(args)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    eager = _classifier(args.variant, args).to(memory_format=fmt)
    compiled = torch.compile(copy.deepcopy(eager), backend=args.compile_backend)
    x = x.contiguous(memory_format=fmt)
    steps = {name: synchronized(_train_step_fn(model, x, labels, _adamw(model), autocast), args.device)
             for name, model in (("eager", eager), ("compiled", compiled))}
    start = time.perf_counter()
    steps["compiled"]()
    compile_s = time.perf_counter() - start
    times = time_alternating(steps, args.iters, args.warmup)
    img_per_s = {name: round(args.batch_size / median(t), 3) for name, t in times.items()}
    return dict(model=args.variant, precision=args.precision, layout=layout, backend=args.compile_backend,
                compile_s=round(compile_s, 2), img_per_s=img_per_s, times_s={n: rounded(t) for n, t in times.items()},
                compile_speedup=round(median(times["eager"]) / median(times["compiled"]), 3),
                faster=max(img_per_s, key=img_per_s.get))


def bench_selection(args) -> dict[str, Any]:
    import timm
    import torch

    from ssl_hybrid.models.flops import count_flops

    model = timm.create_model(args.variant, img_size=args.img_size).to(args.device).eval()
    x, _ = _inputs(args)
    settings = {"none": dict(keep_rate=1.0), "fixed": dict(keep_rate=args.keep_rate),
                "adaptive": dict(keep_share=args.keep_share)}

    def infer(setting: dict[str, Any]) -> Callable[[], None]:
        def run() -> None:
            model.set_token_selection(**setting)
            with torch.no_grad():
                model(x)
        return synchronized(run, args.device)

    times = time_alternating({name: infer(s) for name, s in settings.items()}, args.iters, args.warmup)
    result: dict[str, Any] = dict(model=args.variant, select_blocks=list(model.token_select_blocks),
                                  keep_rate=args.keep_rate, keep_share=args.keep_share, sides={})
    for name, setting in settings.items():
        model.set_token_selection(**setting)
        flops = count_flops(model, x)
        kept = model.last_tokens_kept.float()
        result["sides"][name] = dict(
            img_per_s=round(args.batch_size / median(times[name]), 3), times_s=rounded(times[name]),
            speedup=round(median(times["none"]) / median(times[name]), 3),
            speedup_cpu_time=round(median(times["none"], "cpu") / median(times[name], "cpu"), 3),
            gflops_per_img=round(flops / args.batch_size / 1e9, 3),
            tokens_kept_mean=round(float(kept.mean()), 1), tokens_kept_min=int(kept.min()),
            tokens_kept_max=int(kept.max()))
    result["note"] = ("random-init weights: class-token attention is nearly uniform, so adaptive selection keeps "
                      "about keep_share of the tokens; trained models concentrate attention and keep fewer")
    return result


# ---------------------------------------------------------------------------------------- entry

def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import ssl_hybrid.models  # noqa: F401  (registers hybrid_*)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        from ssl_hybrid.errors import UserError
        raise UserError(f"--sections: unknown {sorted(unknown)}; choose from {SECTIONS}")
    start = time.perf_counter()
    options = ("models", "sections", "variant", "iters", "warmup", "batch_size", "img_size", "threads",
               "extra_threads", "mask_ratio", "keep_rate", "keep_share", "device", "precision", "gemm_size",
               "compile_backend")
    result: dict[str, Any] = dict(
        command="python benchmarks/bench_models.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items()) if k in options),
        machine=machine_info(args.device, packages=("timm",)), batch_size=args.batch_size, img_size=args.img_size, precision=args.precision,
        train_step="forward + cross-entropy + backward + AdamW(foreach)",
        flops_note="FlopCounterMode: matmul/conv/attention only, 2 FLOPs per multiply-add")
    if "masked" in sections:
        result["masked"] = bench_masked(args)
    if "selection" in sections:
        result["selection"] = bench_selection(args)
    main_threads = torch.get_num_threads()
    for threads in [int(t) for t in args.extra_threads.split(",") if t.strip()]:
        torch.set_num_threads(threads)
        extra = result.setdefault("ratios_at_other_thread_counts", {}).setdefault(str(threads), {})
        if "masked" in sections:
            extra["masked"] = bench_masked(args)
        if "selection" in sections:
            extra["selection"] = bench_selection(args)
    torch.set_num_threads(main_threads)
    if "models" in sections:
        result["models"] = bench_models([m.strip() for m in args.models.split(",") if m.strip()], args)
    if "layout" in sections:
        result["layout"] = bench_layout(args)
        result["compile"] = bench_compile(args, result["layout"]["faster"])
    result["machine"]["load_average_end"] = list(os.getloadavg())
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


if __name__ == "__main__":
    import sys

    import timing

    timing.main(sys.modules[__name__])
