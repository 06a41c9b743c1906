"""`ssl-hybrid bench backbone`: train-step and inference throughput of the backbones, side by side.

Three measurements, each written to one JSON:

* ``models``: per model, a train step (forward + cross-entropy + backward + AdamW) at ``--img-size``
  and ``--batch-size``: images/s, GFLOPs per image (FlopCounterMode, fwd+bwd), and the achieved
  FLOP/s divided by a GEMM peak measured right before and after that model (the machine is shared,
  so the peak is taken under the same load as the step it is compared with);
* ``masked``: ``hybrid_small`` encoder train step with a 75% mask vs without (loss on the fused
  tokens; a decoder belongs to the objective and is left out of both sides);
* ``selection``: ``hybrid_small`` inference with no token selection, fixed keep rate, adaptive share.

Ratios compare sides timed in alternation (A, B, A, B, ...) and use medians, so load from other
processes hits both sides alike.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("hybrid_nano,hybrid_tiny,hybrid_small,hybrid_base,vit_tiny_patch16_224,vit_small_patch16_224,"
                  "resnet18,resnet50,convnext_atto")
SECTIONS = ("models", "masked", "selection")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated timm model names for the table")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"which measurements to run: {SECTIONS}")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per side (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument("--img-size", type=int, default=224, help="square input size (multiple of 16)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--variant", default="hybrid_small", help="hybrid model for the masked and selection sections")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="hidden share for the masked step")
    parser.add_argument("--keep-rate", type=float, default=0.7, help="fixed token selection keep rate (EViT)")
    parser.add_argument("--keep-share", type=float, default=0.8,
                        help="adaptive token selection: share of class-token attention to keep")


# ---------------------------------------------------------------------------------------- timing

def _median_seconds(fn: Callable[[], Any], iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def time_alternating(sides: dict[str, Callable[[], Any]], iters: int, warmup: int) -> dict[str, list[float]]:
    """Time several callables in alternation; returns every timing per side."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(iters):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def gemm_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """Best FLOP/s of a square fp32 matmul: the practical ceiling for dense layers on this machine."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_median_seconds(lambda: a @ b, repeats, 1))
    return 2.0 * size ** 3 / best


# ---------------------------------------------------------------------------------------- sections

def _train_step_fn(model, x, labels, optimizer) -> Callable[[], None]:
    import torch.nn.functional as F

    def step() -> None:
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _adamw(model):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, foreach=True)


def bench_models(names: list[str], args) -> list[dict[str, Any]]:
    import timm
    import torch

    from ssl_hybrid.models.flops import count_flops

    rows = []
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    labels = torch.randint(0, 1000, (args.batch_size,))
    for name in names:
        log.info("train step: %s", name)
        kwargs = {"img_size": args.img_size} if name.startswith(("hybrid_", "vit_")) else {}
        model = timm.create_model(name, num_classes=1000, **kwargs).train()
        flops = count_flops(model, x, train_step=True)
        peak_before = gemm_peak_flops()
        times = _median_seconds(_train_step_fn(model, x, labels, _adamw(model)), args.iters, args.warmup)
        peak = 0.5 * (peak_before + gemm_peak_flops())
        seconds = statistics.median(times)
        rows.append(dict(
            model=name, params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            img_per_s=round(args.batch_size / seconds, 3), step_s=round(seconds, 3), step_times_s=[round(t, 3) for t in times],
            train_gflops_per_img=round(flops / args.batch_size / 1e9, 3),
            achieved_gflop_per_s=round(flops / seconds / 1e9, 2), gemm_peak_gflop_per_s=round(peak / 1e9, 2),
            utilization=round(flops / seconds / peak, 3)))
        log.info("%s", rows[-1])
        del model
    return rows


def bench_masked(args) -> dict[str, Any]:
    import timm
    import torch

    from ssl_hybrid.models.flops import count_flops
    from ssl_hybrid.models.masking import random_grid_mask

    model = timm.create_model(args.variant, img_size=args.img_size).train()
    optimizer = _adamw(model)
    grid = args.img_size // 16
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    mask = random_grid_mask(args.batch_size, grid, grid, args.mask_ratio, generator=torch.Generator().manual_seed(0))

    def encoder_step(masked: bool) -> Callable[[], None]:
        def step() -> None:
            out = model.forward_masked(x, mask)["fused"] if masked else model.forward_features(x)
            out.pow(2).mean().backward()  # stand-in for the objective; the decoder is not the backbone's
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    flops = {
        "unmasked": count_flops(model, x, train_step=True, forward_fn=lambda m, i: m.forward_features(i)),
        "masked": count_flops(model, x, train_step=True, forward_fn=lambda m, i: m.forward_masked(i, mask)["fused"]),
    }
    times = time_alternating({"unmasked": encoder_step(False), "masked": encoder_step(True)}, args.iters, args.warmup)
    median = {side: statistics.median(t) for side, t in times.items()}
    return dict(
        model=args.variant, mask_ratio=args.mask_ratio,
        img_per_s={side: round(args.batch_size / s, 3) for side, s in median.items()},
        step_times_s={side: [round(t, 3) for t in ts] for side, ts in times.items()},
        train_gflops_per_img={side: round(f / args.batch_size / 1e9, 3) for side, f in flops.items()},
        speedup=round(median["unmasked"] / median["masked"], 3),
        flops_ratio=round(flops["unmasked"] / flops["masked"], 3))


def bench_selection(args) -> dict[str, Any]:
    import timm
    import torch

    from ssl_hybrid.models.flops import count_flops

    model = timm.create_model(args.variant, img_size=args.img_size).eval()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    settings = {"none": dict(keep_rate=1.0), "fixed": dict(keep_rate=args.keep_rate),
                "adaptive": dict(keep_share=args.keep_share)}

    def infer(setting: dict[str, Any]) -> Callable[[], None]:
        def run() -> None:
            model.set_token_selection(**setting)
            with torch.no_grad():
                model(x)
        return run

    times = time_alternating({name: infer(s) for name, s in settings.items()}, args.iters, args.warmup)
    result: dict[str, Any] = dict(model=args.variant, select_blocks=list(model.token_select_blocks),
                                  keep_rate=args.keep_rate, keep_share=args.keep_share, sides={})
    base = statistics.median(times["none"])
    for name, setting in settings.items():
        model.set_token_selection(**setting)
        flops = count_flops(model, x)
        kept = model.last_tokens_kept.float()
        seconds = statistics.median(times[name])
        result["sides"][name] = dict(
            img_per_s=round(args.batch_size / seconds, 3), times_s=[round(t, 3) for t in times[name]],
            speedup=round(base / seconds, 3), gflops_per_img=round(flops / args.batch_size / 1e9, 3),
            tokens_kept_mean=round(float(kept.mean()), 1), tokens_kept_min=int(kept.min()),
            tokens_kept_max=int(kept.max()))
    result["note"] = ("random-init weights: class-token attention is nearly uniform, so adaptive selection keeps "
                      "about keep_share of the tokens; trained models concentrate attention and keep fewer")
    return result


# ---------------------------------------------------------------------------------------- entry

def _machine() -> dict[str, Any]:
    import timm
    import torch

    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                timm=timm.__version__, load_average=list(os.getloadavg()))


def _targets(result: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    if "masked" in result:
        speedup = result["masked"]["speedup"]
        targets["masked_speedup>=2.5"] = dict(measured=speedup, met=speedup >= 2.5)
    small = [r for r in result.get("models", []) if r["model"] == "hybrid_small"]
    if small:
        targets["hybrid_small_utilization>=0.5"] = dict(measured=small[0]["utilization"],
                                                        met=small[0]["utilization"] >= 0.5)
    if "selection" in result:
        speedup = result["selection"]["sides"]["fixed"]["speedup"]
        targets["selection_fixed_speedup>=1.4"] = dict(measured=speedup, met=speedup >= 1.4)
    return targets


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import ssl_hybrid  # noqa: F401  (registers hybrid_*)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        from ssl_hybrid.errors import UserError
        raise UserError(f"--sections: unknown {sorted(unknown)}; choose from {SECTIONS}")
    start = time.perf_counter()
    result: dict[str, Any] = dict(
        command="ssl-hybrid bench backbone " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items())
            if k in ("models", "sections", "variant", "iters", "warmup", "batch_size", "img_size", "threads", "mask_ratio",
                     "keep_rate", "keep_share")),
        machine=_machine(), batch_size=args.batch_size, img_size=args.img_size, precision="fp32",
        train_step="forward + cross-entropy + backward + AdamW(foreach)",
        flops_note="FlopCounterMode: matmul/conv/attention only, 2 FLOPs per multiply-add")
    if "masked" in sections:
        result["masked"] = bench_masked(args)
    if "selection" in sections:
        result["selection"] = bench_selection(args)
    if "models" in sections:
        result["models"] = bench_models([m.strip() for m in args.models.split(",") if m.strip()], args)
    result["targets"] = _targets(result)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result
