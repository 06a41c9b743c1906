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
    parser.add_argument("--extra-threads", default="",
                        help="comma-separated thread counts to repeat the masked/selection ratios at (e.g. 1): "
                             "shows how much load from other processes, not the model, moves the ratios")
    parser.add_argument("--variant", default="hybrid_small", help="hybrid model for the masked and selection sections")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="hidden share for the masked step")
    parser.add_argument("--keep-rate", type=float, default=0.7, help="fixed token selection keep rate (EViT)")
    parser.add_argument("--keep-share", type=float, default=0.8,
                        help="adaptive token selection: share of class-token attention to keep")


# ---------------------------------------------------------------------------------------- timing

def time_alternating(sides: dict[str, Callable[[], Any]], iters: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Time callables in alternation (A, B, A, B, ...): ``{side: {"wall": [...], "cpu": [...]}}`` seconds.

    ``cpu`` is this process's CPU time (all threads): it barely grows when other processes compete
    for the cores, so its ratios are the more load-robust ones; ``wall`` is what a user waits.
    """
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times = {name: {"wall": [], "cpu": []} for name in sides}
    for _ in range(iters):
        for name, fn in sides.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def _median(times: dict[str, list[float]], clock: str = "wall") -> float:
    return statistics.median(times[clock])


def _rounded(times: dict[str, list[float]]) -> dict[str, list[float]]:
    return {clock: [round(t, 3) for t in values] for clock, values in times.items()}


GEMM_SIZE = 1024
GEMM_REPEATS = 4


def gemm_fn() -> tuple[Callable[[], None], float]:
    """A square fp32 matmul workload and its FLOPs: the practical ceiling for dense layers here."""
    import torch

    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)

    def run() -> None:
        for _ in range(GEMM_REPEATS):
            torch.mm(a, b)

    return run, 2.0 * GEMM_SIZE ** 3 * GEMM_REPEATS


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
    """Train step per model, timed in alternation with the GEMM workload (peak under the same load)."""
    import timm
    import torch

    from ssl_hybrid.models.flops import count_flops

    rows = []
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    labels = torch.randint(0, 1000, (args.batch_size,))
    gemm, gemm_flops = gemm_fn()
    for name in names:
        log.info("train step: %s", name)
        kwargs = {"img_size": args.img_size} if name.startswith(("hybrid_", "vit_")) else {}
        model = timm.create_model(name, num_classes=1000, **kwargs).train()
        flops = count_flops(model, x, train_step=True)
        times = time_alternating({"step": _train_step_fn(model, x, labels, _adamw(model)), "gemm": gemm},
                                 args.iters, args.warmup)
        step_s, gemm_s = _median(times["step"]), _median(times["gemm"])
        utilization_cpu = (flops / _median(times["step"], "cpu")) / (gemm_flops / _median(times["gemm"], "cpu"))
        rows.append(dict(
            model=name, params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            img_per_s=round(args.batch_size / step_s, 3), step_s=round(step_s, 3),
            train_gflops_per_img=round(flops / args.batch_size / 1e9, 3),
            achieved_gflop_per_s=round(flops / step_s / 1e9, 2),
            gemm_peak_gflop_per_s=round(gemm_flops / gemm_s / 1e9, 2),
            utilization=round((flops / step_s) / (gemm_flops / gemm_s), 3),
            utilization_cpu_time=round(utilization_cpu, 3),
            times_s=_rounded(times["step"]), gemm_times_s=_rounded(times["gemm"])))
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
    return dict(
        model=args.variant, mask_ratio=args.mask_ratio,
        img_per_s={side: round(args.batch_size / _median(t), 3) for side, t in times.items()},
        times_s={side: _rounded(t) for side, t in times.items()},
        train_gflops_per_img={side: round(f / args.batch_size / 1e9, 3) for side, f in flops.items()},
        speedup=round(_median(times["unmasked"]) / _median(times["masked"]), 3),
        speedup_cpu_time=round(_median(times["unmasked"], "cpu") / _median(times["masked"], "cpu"), 3),
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
    for name, setting in settings.items():
        model.set_token_selection(**setting)
        flops = count_flops(model, x)
        kept = model.last_tokens_kept.float()
        result["sides"][name] = dict(
            img_per_s=round(args.batch_size / _median(times[name]), 3), times_s=_rounded(times[name]),
            speedup=round(_median(times["none"]) / _median(times[name]), 3),
            speedup_cpu_time=round(_median(times["none"], "cpu") / _median(times[name], "cpu"), 3),
            gflops_per_img=round(flops / args.batch_size / 1e9, 3),
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
    """Each target judged on the main run's wall clock; CPU-time and other thread counts alongside."""
    targets: dict[str, Any] = {}
    other = result.get("ratios_at_other_thread_counts", {})

    def add(key: str, wall: float, cpu: float, goal: float, section: str, pick: Callable[[dict], float]) -> None:
        targets[key] = dict(measured=wall, measured_cpu_time=cpu, met=wall >= goal)
        for threads, extra in other.items():
            if section in extra:
                targets[key][f"measured_at_{threads}_threads"] = pick(extra[section])

    if "masked" in result:
        add("masked_speedup>=2.5", result["masked"]["speedup"], result["masked"]["speedup_cpu_time"], 2.5,
            "masked", lambda m: m["speedup"])
    for row in result.get("models", []):
        if row["model"] == "hybrid_small":
            add("hybrid_small_utilization>=0.5", row["utilization"], row["utilization_cpu_time"], 0.5,
                "models", lambda rows: rows[0]["utilization"])
    if "selection" in result:
        fixed = result["selection"]["sides"]["fixed"]
        add("selection_fixed_speedup>=1.4", fixed["speedup"], fixed["speedup_cpu_time"], 1.4,
            "selection", lambda sel: sel["sides"]["fixed"]["speedup"])
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
    options = ("models", "sections", "variant", "iters", "warmup", "batch_size", "img_size", "threads",
               "extra_threads", "mask_ratio", "keep_rate", "keep_share")
    result: dict[str, Any] = dict(
        command="ssl-hybrid bench backbone " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items()) if k in options),
        machine=_machine(), batch_size=args.batch_size, img_size=args.img_size, precision="fp32",
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
    result["targets"] = _targets(result)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result
