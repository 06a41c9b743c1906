"""Measured constraints: parameters, FLOPs (counted by FlopCounterMode) and latency on this device.

Every number is measured on the built model, never estimated from a formula. The checks run cheapest
first (parameters need no forward pass, FLOPs one, latency many), and a candidate stops at its first
violated limit, so an over-budget candidate costs almost nothing and is never trained.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch

from ssl_hybrid.models.contract import TimmModel

log = logging.getLogger(__name__)


@dataclass
class Budget:
    """Limits a candidate must meet before it is trained; 0 = no limit."""

    # Parameter count in millions.
    max_params_m: float = 0.0
    # Forward GFLOPs per image at the search image size (FlopCounterMode counts a multiply-add as 2).
    max_gflops: float = 0.0
    # Median inference latency of one batch of ``latency_batch_size`` images, in milliseconds.
    max_latency_ms: float = 0.0
    # Minimum training throughput (forward + backward + SGD step), images per second; measured only when set.
    min_train_images_per_s: float = 0.0
    # Batch size for the latency measurement (1 = interactive latency; larger = serving throughput).
    latency_batch_size: int = 1
    # Batch size for the training-throughput measurement.
    train_batch_size: int = 16
    # Timed repetitions (median reported) after ``warmup`` untimed ones.
    repeats: int = 10
    warmup: int = 2


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gflops(model: torch.nn.Module, image_size: int) -> float:
    """Forward GFLOPs for one image, via the backbone stage's FlopCounterMode helper."""
    from ssl_hybrid.models.flops import count_flops

    flops = count_flops(model, (1, 3, image_size, image_size))
    if isinstance(flops, dict):  # a helper that also reports per-module counts keeps the total under "total"
        flops = flops.get("total", flops.get("flops"))
    return float(flops) / 1e9


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(step: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    _synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_latency_ms(
    model: torch.nn.Module, image_size: int, batch_size: int, device: torch.device, repeats: int = 10, warmup: int = 2
) -> float:
    """Median wall time of ``forward_features`` on a random batch, eval mode, no autograd."""
    model = model.to(device).eval()
    forward_features = cast(TimmModel, model).forward_features
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    with torch.inference_mode():
        seconds = _median_seconds(lambda: forward_features(images), device, repeats, warmup)
    return seconds * 1e3


def measure_train_images_per_s(
    model: torch.nn.Module, image_size: int, batch_size: int, device: torch.device, repeats: int = 5, warmup: int = 1
) -> float:
    """Images/s of a forward + backward + SGD step (a stand-in loss on the features; the objective adds its
    heads on top, so this is an upper bound on the pretraining throughput)."""
    model = model.to(device).train()
    forward_features = cast(TimmModel, model).forward_features
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: measure the step, leave weights alone

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_features(images).float().pow(2).mean().backward()
        optimizer.step()

    seconds = _median_seconds(step, device, repeats, warmup)
    optimizer.zero_grad(set_to_none=True)
    return batch_size / seconds


def measure_and_check(
    model: torch.nn.Module, image_size: int, budget: Budget, device: torch.device | None = None
) -> dict[str, Any]:
    """Measurements plus ``rejected`` (the first violated limit, or None). Stops measuring at the first violation."""
    device = device or torch.device("cpu")
    result: dict[str, Any] = {"device": str(device), "image_size": image_size, "rejected": None}
    result["params_m"] = count_params(model) / 1e6
    if budget.max_params_m and result["params_m"] > budget.max_params_m:
        result["rejected"] = f"params {result['params_m']:.2f} M > max_params_m {budget.max_params_m:g}"
        return result
    result["gflops"] = count_gflops(model, image_size)
    if budget.max_gflops and result["gflops"] > budget.max_gflops:
        result["rejected"] = f"GFLOPs {result['gflops']:.3f} > max_gflops {budget.max_gflops:g}"
        return result
    result["latency_ms"] = measure_latency_ms(
        model, image_size, budget.latency_batch_size, device, budget.repeats, budget.warmup
    )
    result["latency_batch_size"] = budget.latency_batch_size
    if budget.max_latency_ms and result["latency_ms"] > budget.max_latency_ms:
        result["rejected"] = f"latency {result['latency_ms']:.1f} ms > max_latency_ms {budget.max_latency_ms:g}"
        return result
    if budget.min_train_images_per_s:
        result["train_images_per_s"] = measure_train_images_per_s(model, image_size, budget.train_batch_size, device)
        if result["train_images_per_s"] < budget.min_train_images_per_s:
            result["rejected"] = (
                f"train throughput {result['train_images_per_s']:.1f} img/s < "
                f"min_train_images_per_s {budget.min_train_images_per_s:g}"
            )
    return result
