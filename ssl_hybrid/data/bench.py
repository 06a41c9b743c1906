"""``ssl-hybrid bench data``: is the shard stream the bottleneck?

Measures, in one run and alternating so machine load hits both alike, samples/s of

- **stream**: the full training stream (tar read, shuffle buffer, decode, two augmented views, collate),
- **raw limit**: the same decode + augmentations + collate from sample bytes already in memory,

for each worker count, through the same DataLoader set-up; ``ratio = stream / raw`` (target >= 0.9).
Timing starts when the first batch arrives, so worker start-up is excluded on both sides.
Imports stay inside functions: the CLI imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", default=None, help="shards to read; default: the embedded corpus (data.train)")
    parser.add_argument("--workers", default="1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--samples", type=int, default=320, help="samples timed per measurement")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per batch")
    parser.add_argument("--image-size", type=int, default=224, help="global view size (two DINO global views)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements per side; best is reported")


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
                        yield self.stream.collate(batch)
                        batch = []

        return MemoryStream(*args, **kwargs)


def _rate(iterable, samples: int) -> float:
    iterator = iter(iterable)
    next(iterator)  # first batch: worker start-up and first shard open, excluded from the timing
    counted, start = 0, time.perf_counter()
    while counted < samples:
        counted += len(next(iterator)["key"])
    return counted / (time.perf_counter() - start)


def _measure(cfg, spec: str, workers: int, args, transform, raw_samples: list) -> dict:
    import webdataset as wds

    from ssl_hybrid.data.stream import build_train_stream

    def stream_rate() -> float:
        stream = build_train_stream(cfg, args.batch_size, 0, 0, 1, transform, num_workers=workers, spec=spec)
        return _rate(stream, args.samples)

    def raw_rate() -> float:
        template = build_train_stream(cfg, args.batch_size, 0, 0, 1, transform, num_workers=workers, spec=spec)
        dataset = _MemoryStream(raw_samples, template._dataset(), args.batch_size, workers)
        extra = {"prefetch_factor": 2} if workers > 0 else {}  # the stream's DataLoader settings
        loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers, **extra)
        return _rate(loader, args.samples)

    stream_rates, raw_rates = [], []
    for _ in range(args.repeats):
        raw_rates.append(raw_rate())
        stream_rates.append(stream_rate())
    best_stream, best_raw = max(stream_rates), max(raw_rates)
    return {"workers": workers, "stream_samples_per_s": round(best_stream, 2), "raw_samples_per_s": round(best_raw, 2),
            "ratio": round(best_stream / best_raw, 3),
            "ratio_median": round(statistics.median(stream_rates) / statistics.median(raw_rates), 3),
            "stream_runs": [round(r, 2) for r in stream_rates], "raw_runs": [round(r, 2) for r in raw_rates]}


def run_benchmark(args: argparse.Namespace) -> dict:
    import torch

    from ssl_hybrid.config import REPO_ROOT, DataConfig
    from ssl_hybrid.data.stream import read_shard, resolve_shards
    from ssl_hybrid.data.views import build_transform

    spec = args.shards or str(REPO_ROOT / DataConfig().train)
    cfg = DataConfig(train=spec, image_size=args.image_size, views="dino", num_local_views=0)
    transform = build_transform(cfg)  # DINO with 0 local crops: exactly two augmented global views
    raw_samples = [sample for url in resolve_shards(spec) for sample in read_shard(url)]
    log.info("bench data: %d samples in memory from %s", len(raw_samples), spec)
    results = [_measure(cfg, spec, int(w), args, transform, raw_samples) for w in str(args.workers).split(",")]
    return {
        "target": "data",
        "command": f"ssl-hybrid bench data --workers {args.workers} --samples {args.samples} "
                   f"--batch-size {args.batch_size} --image-size {args.image_size} --repeats {args.repeats}"
                   + (f" --shards {args.shards}" if args.shards else ""),
        "what": "samples/s: full stream (tar read, shuffle buffer, decode, 2 DINO global views, collate) vs raw "
                "limit (same decode+views+collate from bytes in memory), best of repeats; target ratio >= 0.9",
        "shards": spec, "corpus_samples": len(raw_samples), "shuffle_buffer": cfg.shuffle_buffer,
        "results": results,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
    }
