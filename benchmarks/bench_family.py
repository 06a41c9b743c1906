"""``python benchmarks/bench_family.py``: the efficiency features of the hybrid family on the default model, each
against the same model without it, side by side in one run.

* ``selection``: at each ``--sizes`` (224 and 384 px), inference and a train step with no token selection, EViT
  token selection at a fixed keep rate, and adaptive per-image compute (a share of class-token attention);
* ``attention``: at ``--attn-size`` (384 px), inference and a train step with dense (global) attention, window
  attention and top-k attention.

Every side is the same model (``--model``, default ``resvit_tiny``: the default model) with the same weights,
switched with ``set_token_selection`` / ``set_attention`` before each call; sides are timed in alternation
(A, B, C, A, B, C, ...) and the medians compared, so load from other processes hits every side alike. Inference is
``forward_multiscale`` (the embedding the evaluators score) without gradients; a train step is forward +
cross-entropy on a 1000-class head over the pooled feature + backward + AdamW. ``--weights`` loads a model folder
(an export of a pretraining run) first: class-token attention of a random init is nearly uniform, so adaptive
selection keeps about ``--keep-share`` of the tokens there, trained weights concentrate attention.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from timing import main, median, rounded, time_alternating

from ssl_hybrid.machine import machine_info

SELECTION = ("none", "fixed", "adaptive")
ATTENTION = ("global", "window", "topk")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="resvit_tiny", help="preset of the hybrid family (the default model)")
    parser.add_argument("--weights", default="", help="model folder to load weights from (else random init)")
    parser.add_argument("--sections", default="selection,attention", help="selection, attention")
    parser.add_argument("--sizes", default="224,384", help="image sizes of the selection section")
    parser.add_argument("--attn-size", type=int, default=384, help="image size of the attention section")
    parser.add_argument("--batch-size", type=int, default=8, help="images per call")
    parser.add_argument("--iters", type=int, default=5, help="timed rounds (each side once per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--keep-rate", type=float, default=0.7, help="fixed token selection keep rate (EViT)")
    parser.add_argument("--keep-share", type=float, default=0.9, help="adaptive: share of class-token attention")
    parser.add_argument("--window-size", type=int, default=8, help="window side in tokens (divides the 24x24 grid)")
    parser.add_argument("--topk", type=int, default=49, help="keys per query for top-k attention")


def build(args, img_size: int):
    """The model at ``img_size`` with a 1000-class head (its pooled feature feeds it), weights from ``--weights``."""
    import timm
    import torch

    from ssl_hybrid.models.export import load_backbone

    torch.manual_seed(0)
    model = timm.create_model(args.model, img_size=img_size, num_classes=1000)
    if args.weights:
        trained = load_backbone(args.weights, img_size=img_size)
        missing = model.load_state_dict(trained.state_dict(), strict=False).missing_keys
        assert set(missing) <= {"head.weight", "head.bias"}, missing
    return model


def switches(args) -> dict[str, Callable[[Any], None]]:
    """side name -> how to switch the one model to it (same weights)."""
    return {
        "none": lambda m: m.set_token_selection(1.0),
        "fixed": lambda m: m.set_token_selection(keep_rate=args.keep_rate),
        "adaptive": lambda m: m.set_token_selection(keep_share=args.keep_share),
        "global": lambda m: m.set_attention("global"),
        "window": lambda m: m.set_attention("window", window_size=args.window_size),
        "topk": lambda m: m.set_attention("topk", topk=args.topk),
    }


def compare(model, sides: tuple[str, ...], args, img_size: int) -> dict[str, Any]:
    """Inference and train-step medians of each side, and their speed-up over the first side."""
    import torch
    import torch.nn.functional as F

    from ssl_hybrid.models.flops import count_flops

    switch = switches(args)
    x = torch.randn(args.batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 1000, (args.batch_size,), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

    def infer(side: str) -> Callable[[], None]:
        def run() -> None:
            switch[side](model)
            model.eval()
            with torch.no_grad():
                model.forward_multiscale(x)
        return run

    def train(side: str) -> Callable[[], None]:
        def run() -> None:
            switch[side](model)
            model.train()
            loss = F.cross_entropy(model.forward_head(model.forward_features(x)), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    timings = {
        "inference": time_alternating({s: infer(s) for s in sides}, args.iters, args.warmup),
        "train_step": time_alternating({s: train(s) for s in sides}, args.iters, args.warmup),
    }
    result: dict[str, Any] = {"img_size": img_size, "tokens": (img_size // 16) ** 2, "sides": {}}
    for side in sides:
        switch[side](model)
        model.eval()
        with torch.no_grad():
            flops = count_flops(model, x, forward_fn=lambda m, images: m.forward_multiscale(images))
            model.forward_features(x)
        kept = model.last_tokens_kept.float()
        row: dict[str, Any] = {"gflops_per_img_inference": round(flops / args.batch_size / 1e9, 3),
                               "tokens_kept_mean": round(float(kept.mean()), 1), "tokens_kept_min": int(kept.min()),
                               "tokens_kept_max": int(kept.max())}
        for kind, times in timings.items():
            row[kind] = {"img_per_s": round(args.batch_size / median(times[side]), 3),
                         "speedup": round(median(times[sides[0]]) / median(times[side]), 3),
                         "speedup_cpu_time": round(median(times[sides[0]], "cpu") / median(times[side], "cpu"), 3),
                         "times_s": rounded(times[side])}
        result["sides"][side] = row
    switch[sides[0]](model)
    return result


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import ssl_hybrid.models  # noqa: F401  (registers the presets)

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"selection", "attention"}
    if unknown:
        from ssl_hybrid.errors import UserError

        raise UserError(f"--sections: unknown {sorted(unknown)}; choose from selection, attention")
    result: dict[str, Any] = {
        "command": "python benchmarks/bench_family.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items()) if k not in ("out", "quiet")),
        "machine": {**machine_info(packages=("timm",)), "load_average_start": list(os.getloadavg())},
        "model": args.model, "weights": args.weights or "random init", "batch_size": args.batch_size,
        "inference": "forward_multiscale (the evaluators' embedding), no gradients",
        "train_step": "forward_features + pooled 1000-class head + cross-entropy + backward + AdamW(foreach)",
    }
    if "selection" in sections:
        settings = dict(keep_rate=args.keep_rate, keep_share=args.keep_share)
        result["selection"] = {"settings": settings, "sizes": {}}
        for size in [int(s) for s in args.sizes.split(",") if s.strip()]:
            model = build(args, size)
            result["selection"]["select_blocks"] = list(model.token_select_blocks)
            result["selection"]["sizes"][str(size)] = compare(model, SELECTION, args, size)
    if "attention" in sections:
        model = build(args, args.attn_size)
        result["attention"] = {"settings": dict(window_size=args.window_size, topk=args.topk),
                               **compare(model, ATTENTION, args, args.attn_size)}
    result["machine"]["load_average_end"] = list(os.getloadavg())
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


if __name__ == "__main__":
    import sys

    main(sys.modules[__name__])
