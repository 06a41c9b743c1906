"""``ssl-hybrid bench data``: is the shard stream the bottleneck?

Measures, in one run and alternating so machine load hits both alike, samples/s of

- **stream**: the full training stream (tar read, shuffle buffer, decode, two augmented views, collate),
- **raw limit**: the same decode + augmentations + collate from sample bytes already in memory,

for each worker count, through the same DataLoader set-up. ``ratio`` is the median over back-to-back
(raw, stream) pairs of stream / raw: on a shared 2-core machine the load drifts, and pairing cancels most
of it (the JSON holds measurements only; the target is in the README's benchmark table). Timing starts when
the first batch arrives, so worker start-up is excluded on both sides.
Imports stay inside functions: the CLI imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", default=None, help="shards to read; default: the embedded corpus (data.train)")
    parser.add_argument("--workers", default="1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--samples", type=int, default=96, help="samples timed per measurement")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per batch")
    parser.add_argument("--image-size", type=int, default=224, help="global view size (two DINO global views)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="back-to-back (raw, stream) pairs per worker count; the median pair ratio is reported",
    )


class _MemoryStream:
    """IterableDataset over in-memory raw samples doing exactly the stream's per-sample work."""

    def __new__(cls, *args, **kwargs):  # built lazily so importing this module does not import torch
        import torch

        class MemoryStream(torch.utils.data.IterableDataset):
            def __init__(self, raw: list, stream, batch_size: int, num_workers: int):
                self.raw, self.stream, self.batch_size, self.num_workers = raw, stream, batch_size, max(1, num_workers)

            def __iter__(self):
                info = torch.utils.data.get_worker_info()
                worker = info.id if info is not None else 0
                batch, index = [], worker
                while True:  # endless, like the training stream
                    raw = self.raw[index % len(self.raw)]
                    item, _ = self.stream.make_sample(raw, index, in_main=info is None)
                    index += self.num_workers
                    if item is not None:
                        batch.append(item)
                    if len(batch) == self.batch_size:
                        yield self.stream.spec.collate(batch)
                        batch = []

        return MemoryStream(*args, **kwargs)


def _cpu_seconds() -> float:
    """CPU time of this process and its live children (the DataLoader workers); psutil comes with accelerate."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for process in [me] + me.children(recursive=True):
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # a worker that just exited
            pass
    return total


def _rate(iterable, samples: int) -> tuple[float, float]:
    """(samples per wall-clock second, samples per CPU second of main process + workers)."""
    iterator = iter(iterable)
    next(iterator)  # first batch: worker start-up and first shard open, excluded from the timing
    counted, start, cpu_start = 0, time.perf_counter(), _cpu_seconds()
    while counted < samples:
        counted += len(next(iterator)["key"])
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    return counted / wall, counted / max(cpu, 1e-9)


def _measure(cfg, spec: str, workers: int, args, transform, raw_samples: list) -> dict:
    import webdataset as wds

    from ssl_hybrid.data.stream import build_train_stream

    def stream_rate() -> tuple[float, float]:
        stream = build_train_stream(cfg, args.batch_size, 0, 0, 1, transform, num_workers=workers, spec=spec)
        return _rate(stream, args.samples)

    def raw_rate() -> tuple[float, float]:
        template = build_train_stream(cfg, args.batch_size, 0, 0, 1, transform, num_workers=workers, spec=spec)
        dataset = _MemoryStream(raw_samples, template._dataset(), args.batch_size, workers)
        extra = {"prefetch_factor": 2} if workers > 0 else {}  # the stream's DataLoader settings
        loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers, **extra)
        return _rate(loader, args.samples)

    # Pairs run back to back, in alternating order, so slow drifts in machine load cancel in each ratio.
    runs: dict[str, list[tuple[float, float]]] = {"raw": [], "stream": []}
    for repeat in range(args.repeats):
        for side in ("raw", "stream") if repeat % 2 == 0 else ("stream", "raw"):
            runs[side].append(raw_rate() if side == "raw" else stream_rate())
    wall = {side: [r[0] for r in values] for side, values in runs.items()}
    cpu = {side: [r[1] for r in values] for side, values in runs.items()}
    pair_ratios = [s / r for s, r in zip(wall["stream"], wall["raw"])]
    return {
        "workers": workers,
        "stream_samples_per_s": round(statistics.median(wall["stream"]), 2),
        "raw_samples_per_s": round(statistics.median(wall["raw"]), 2),
        "ratio": round(statistics.median(pair_ratios), 3),
        "ratio_best_of": round(max(wall["stream"]) / max(wall["raw"]), 3),
        # Samples per CPU-second barely depend on other jobs' load: the overhead the stream itself adds.
        "cpu_ratio": round(statistics.median(cpu["stream"]) / statistics.median(cpu["raw"]), 3),
        "stream_samples_per_cpu_s": round(statistics.median(cpu["stream"]), 2),
        "raw_samples_per_cpu_s": round(statistics.median(cpu["raw"]), 2),
        "pair_ratios": [round(r, 3) for r in pair_ratios],
        "stream_runs": [round(r, 2) for r in wall["stream"]],
        "raw_runs": [round(r, 2) for r in wall["raw"]],
    }


def run_benchmark(args: argparse.Namespace) -> dict:
    from ssl_hybrid.config import REPO_ROOT, DataConfig
    from ssl_hybrid.data.sources import resolve_shards
    from ssl_hybrid.data.stream import read_shard
    from ssl_hybrid.data.views import build_transform
    from ssl_hybrid.machine import machine_info

    spec = args.shards or str(REPO_ROOT / DataConfig().train)
    cfg = DataConfig(train=spec, image_size=args.image_size, views="dino", num_local_views=0)
    transform = build_transform(cfg)  # DINO with 0 local crops: exactly two augmented global views
    raw_samples = [sample for url in resolve_shards(spec) for sample in read_shard(url)]
    log.info("bench data: %d samples in memory from %s", len(raw_samples), spec)
    results = [_measure(cfg, spec, int(w), args, transform, raw_samples) for w in str(args.workers).split(",")]
    return {
        "benchmark": "data",
        "command": f"ssl-hybrid bench data --workers {args.workers} --samples {args.samples} "
        f"--batch-size {args.batch_size} --image-size {args.image_size} --repeats {args.repeats}"
        + (f" --shards {args.shards}" if args.shards else ""),
        "what": "samples/s: full stream (tar read, shuffle buffer, decode, 2 DINO global views, collate) vs raw "
        "limit (same decode+views+collate from bytes in memory); ratio = median over back-to-back pairs "
        "of stream/raw wall-clock rates (rates shown: medians); cpu_ratio = the same per CPU-second of "
        "main process + workers (insensitive to other jobs' load)",
        "load_average_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "shards": spec,
        "corpus_samples": len(raw_samples),
        "shuffle_buffer": cfg.shuffle_buffer,
        "results": results,
        "machine": machine_info(),
    }
