"""Streaming reader for ``ssl_hybrid-shards/1`` tar shards (see :mod:`ssl_hybrid.data.shards`).

Pipeline per DataLoader worker: shard list for (seed, epoch, rank, worker) -> tar read (the package's
one tar reader, :func:`ssl_hybrid.data.shards.tar_members`, over webdataset's ``gopen``, so local paths,
``pipe:`` and ``http(s)://`` URLs work) -> members grouped into samples by webdataset's ``base_plus_ext``
-> seeded sample shuffle buffer over the *compressed* bytes -> decode + multi-view transform -> batch +
collate. Batches are formed inside the workers; the DataLoader (a ``webdataset.WebLoader``) only moves them.
The shard list comes from :func:`ssl_hybrid.data.sources.resolve_shard_set` (the resolver labeled sets use
too); what a stream reads and how is one frozen :class:`StreamSpec`.

What is webdataset's and what is not (and why). From webdataset: ``gopen`` (opening any URL), the
key/extension split ``base_plus_ext``, the ``__meta__`` member convention and ``WebLoader``. Written here,
because webdataset's versions cannot give what this stream promises:

- ``tar_file_expander`` / ``tar_file_iterator`` + ``group_by_keys`` (webdataset 1.0) read a member's bytes
  before yielding its name, so a shard cut inside a member loses the *previous*, complete sample too, and
  their handlers see an exception, not how many samples a shard lost. :func:`read_shard` yields a sample
  as soon as the next member's header names another key and turns a cut or unreadable shard into one
  counted placeholder per lost sample (from the manifest), so skip counts and the resume offset are exact.
- ``group_by_keys`` drops members without extension silently and raises on a duplicate field; here a
  member without extension or with an unsafe name (absolute, ``..``) is a counted bad sample with a
  one-line warning naming ``__url__`` and ``__key__``, like a corrupt image (decoding is per sample, in
  :meth:`ShardStream.make_sample`, not a webdataset decoder that would stop or silently drop).
- webdataset's ``detshuffle``, ``ResampledShards`` and ``split_by_node`` / ``split_by_worker`` can be
  seeded, but keep no position to save, let the shuffle buffer run on across shard and epoch boundaries
  and split by the physical worker id. Exact mid-epoch resume (below) needs each worker-epoch to be a pure
  function of (seed, epoch, rank, logical worker) with a buffer that drains at its end, so that replaying
  it and dropping the first ``offset`` samples before decoding restores the position bit for bit.

Splitting. Shards are split by rank first and then by worker, explicitly, from a shard order that
depends only on (seed, epoch):

- exact mode (``data.resampled=false``): every epoch is a seeded permutation of all shards;
  rank ``r`` takes ``perm[r::world_size]`` and its worker ``w`` takes ``[w::num_workers]`` of that, so
  within an epoch every sample is read exactly once across all ranks. Each worker needs at least one
  shard, hence fewer shards than ranks x workers is refused with a :class:`UserError`.
- resampled mode (``data.resampled=true``, training default): an "epoch" of a worker is
  ``ceil(num_shards / (ranks x workers))`` shards drawn with replacement, seeded by
  (seed, epoch, rank, worker); works with any number of shards.

In both modes the stream a rank sees is infinite (workers move on to their next epoch by themselves and
batches run across epoch boundaries), so the trainer's explicit step budget gives every rank the same
number of batches and no rank ever waits at an epoch end. ``epochs=N`` makes it finite (evaluation,
tests); the last batch of each worker may then be partial, and ranks get equal batch counts only when
their shards hold equal sample counts (use the infinite stream + a step budget for DDP training).

Exact resume (design choice). The data position of a rank is, per worker, (epoch, offset): the number
of samples that left that worker's shuffle buffer in that epoch up to the last batch the trainer
*consumed*, plus the worker's seen/skipped counters; batches carry their worker's position, so samples
prefetched but not consumed are not counted. The shuffle buffer is flushed at each worker-epoch end,
so a worker's epoch is a pure function of (seed, epoch, rank, worker, shard bytes). Resuming replays
the current epoch of each worker from its first shard through the same seeded shuffle and drops the
first ``offset`` samples *before decoding* (only tar bytes are re-read, at most one worker-epoch each).
Augmentations are seeded per sample from (seed, rank, worker, epoch, offset), so a resumed run yields
bit-identical batches. The DataLoader hands out batches round-robin from worker 0, so after ``n``
consumed batches the rebuilt loader rotates the logical worker ids by ``n mod num_workers``; the state
therefore only resumes exactly with the same num_workers, world size, seed, batch size and shard
count, and :meth:`TrainStream.load_state_dict` refuses a mismatch rather than silently repeating data.

Bad data. Corrupt image bytes, zero-byte images, samples without an image, unreadable/truncated tars,
decompression bombs and images the transform fails on are skipped with a warning naming ``__url__`` and
``__key__`` and counted. A truncated or unreadable shard counts as many skipped samples as the manifest
says it lost (1 when there is no manifest). Above ``data.max_skip_rate`` (checked once ``data.skip_rate_min_samples``
samples were seen, and at every worker-epoch end) the stream stops with a :class:`DataQualityError`; labeled
sets apply the same rule (:func:`ssl_hybrid.data.sources.skip_rate_exceeded`) to a whole set.

Worker priority. On a CPU trainer the workers share the cores with the training step's compute threads, which
wait for each other: a worker that preempts one of them stalls the whole step. The workers therefore run at
niceness ``data.worker_nice`` (auto: 19 without a GPU, 0 with one) and decode in the time the step leaves; the
trainer's own priority is never touched. On the 2-core VM the quickstart's loop ran 1.09x faster side by side
(benchmarks/results/worker_priority.json; 1.24x in an earlier run).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ssl_hybrid import rng as rng_state
from ssl_hybrid.data import channels as channel_format
from ssl_hybrid.data import shards as shard_format
from ssl_hybrid.data.sources import folder_channels, resolve_shard_set, skip_rate_exceeded
from ssl_hybrid.data.workers import ignore_stop_signals
from ssl_hybrid.errors import UserError

log = logging.getLogger(__name__)

STATE_FORMAT = "ssl_hybrid-stream/1"


class DataQualityError(UserError):
    """Too many corrupt samples, or none decodable: the corpus needs fixing, not the code."""


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def image_entry(sample: dict) -> tuple[str, bytes] | None:
    for key in shard_format.IMAGE_KEYS:
        if key in sample:
            return key, sample[key]
    return None


def decode_image_or_reason(sample: dict, max_pixels: int | None = None):
    """(RGB PIL image, None) or (None, reason); :func:`ssl_hybrid.data.shards.to_rgb` says how modes,
    transparency and EXIF orientation become RGB. A stored N-channel array (``.npy``) comes back as
    ``np.ndarray [C, H, W]`` (:mod:`ssl_hybrid.data.channels`)."""
    if "__error__" in sample:
        return None, sample["__error__"]
    entry = image_entry(sample)
    if entry is None:
        fields = sorted(k for k in sample if not k.startswith("__"))
        return None, f"no image in sample (fields: {', '.join(fields) or 'none'})"
    if bytes(entry[1][:6]) == channel_format.NPY_MAGIC:  # an N-channel array: [C, H, W] in its own dtype
        try:
            return channel_format.decode_npy(entry[1], max_pixels or shard_format.MAX_IMAGE_PIXELS), None
        except ValueError as err:
            return None, str(err)
    try:
        image = shard_format.check_image_bytes(entry[1], max_pixels or shard_format.MAX_IMAGE_PIXELS)
    except ValueError as err:
        return None, str(err)
    try:
        return shard_format.to_rgb(image), None
    except Exception as err:  # PIL raises ValueError/OSError/KeyError for modes and EXIF it cannot handle
        return None, f"cannot convert {image.mode} image to RGB ({type(err).__name__}: {err})"


def decode_image(sample: dict):
    """The sample's image as an RGB ``PIL.Image``, or None when it is missing, corrupt or too large."""
    return decode_image_or_reason(sample)[0]


def sample_label(sample: dict) -> int | None:
    """The integer ``cls`` of a labeled sample, None when unlabeled; ValueError when malformed."""
    if "cls" not in sample:
        return None
    return shard_format.parse_label(sample["cls"])


# ---------------------------------------------------------------------------------------------
# Reading shards (inside a worker)
# ---------------------------------------------------------------------------------------------


def read_shard(url: str, expected: int | None = None) -> Iterator[dict]:
    """Samples of one shard (members grouped by key as webdataset does). A shard that cannot be opened
    or is cut short yields one placeholder (with ``__error__``) per lost sample -- ``expected`` minus the
    samples read when the manifest gives ``expected``, else 1 -- so losses are counted like bad samples.
    A sample is complete (and yielded) as soon as the next member's *header* names another key."""
    from webdataset.tariterators import base_plus_ext

    count = 0
    current: dict | None = None
    try:
        for member, read in shard_format.tar_members(url):
            name = member.name
            prefix, suffix = base_plus_ext(name)
            # a member without extension cannot be a sample field, and an unsafe name not a key: bad samples
            problem = shard_format.unsafe_member_name(name) or (None if prefix else "tar member without extension")
            if problem:
                if current is not None:
                    count += 1
                    yield current
                    current = None
                count += 1
                yield {"__key__": name, "__url__": url, "__error__": problem}
                continue
            if current is not None and prefix != current["__key__"]:
                count += 1
                yield current
                current = None
            if current is None:
                current = {"__key__": prefix, "__url__": url}
            too_large = shard_format.oversized_member(member, suffix)
            if too_large:  # left unread; the sample is a counted bad one
                current["__error__"] = too_large
                continue
            current[suffix.lower()] = read()
        if current is not None:
            count += 1
            yield current
        if expected is not None and count < expected:  # a cut at a header boundary reads as a clean end
            raise EOFError(f"{count} samples, manifest says {expected}")
    except Exception as err:  # tarfile.ReadError, OSError, HTTP errors: the rest of this shard is lost
        lost = max(0, expected - count) if expected is not None else 1
        log.warning(
            "shard %s unreadable after %d samples (%s: %s); counting %d lost samples",
            url,
            count,
            type(err).__name__,
            err,
            lost,
        )
        for index in range(lost):
            yield {
                "__key__": f"<lost {index + 1}/{lost}>",
                "__url__": url,
                "__error__": f"shard unreadable after {count} samples ({type(err).__name__}: {err})",
            }


def shuffle_buffer(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Seeded reservoir shuffle (as webdataset's ``shuffle``) that always drains at the end."""
    if size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    while buffer:
        index = rng.randrange(len(buffer))
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        yield buffer.pop()


def _seed_from(*parts: Any) -> int:
    text = "-".join(str(part) for part in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def seed_global_rngs(seed: int) -> None:
    """Seed python/numpy/torch global RNGs (torchvision and lightly draw from them) for one sample."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would reseed CUDA too


# ---------------------------------------------------------------------------------------------
# The per-worker stream
# ---------------------------------------------------------------------------------------------


def lower_priority(niceness: int) -> None:
    """Raise this process's niceness to at least ``niceness`` (0 = leave it; a process can only lower its own
    priority). Data workers on a CPU trainer run at low priority: the training step's compute threads wait for each
    other, so a worker preempting one stalls both, while a low-priority worker only takes the time they leave."""
    current = os.nice(0)
    if niceness > current:
        os.nice(niceness - current)


def resolve_worker_nice(setting: int) -> int:
    """``data.worker_nice``: -1 = auto (19 without a GPU, where workers and compute share the cores; 0 with one)."""
    if setting >= 0:
        return setting
    return 0 if torch.cuda.is_available() else 19


@dataclass(frozen=True)
class StreamSpec:
    """Everything a stream reads and how, resolved once by :func:`build_train_stream` and shared by the
    trainer-facing :class:`TrainStream` and its workers' :class:`ShardStream` (the position is not in it)."""

    urls: list[str]
    counts: dict[str, int] | None  # samples per shard, from the manifest: a cut shard's loss is counted exactly
    transform: Callable  # PIL image -> {"global_views": [...], "local_views": [...]}
    collate: Callable
    batch_size: int
    seed: int
    rank: int
    world_size: int
    num_workers: int  # DataLoader workers; 0 = read in the main process
    resampled: bool
    buffer_size: int
    max_skip_rate: float
    skip_rate_min_samples: int
    epochs: int | None = None  # None = infinite
    worker_nice: int = 0
    name: str = ""  # the spec as the user wrote it, for messages

    @property
    def slots(self) -> int:
        """Logical workers: the main process counts as one."""
        return max(1, self.num_workers)


def fresh_position() -> dict:
    return {"epoch": 0, "offset": 0, "seen": 0, "skipped": 0}


class ShardStream(torch.utils.data.IterableDataset):
    """Yields collated batches with a ``_meta`` position (or ``{"_abort": message}``); see module doc."""

    def __init__(self, spec: StreamSpec, positions: list[dict], rotation: int = 0):
        super().__init__()
        self.spec, self.positions, self.rotation = spec, positions, rotation

    # -- shard order -------------------------------------------------------------------------
    def epoch_shards(self, epoch: int, worker: int) -> list[str]:
        if self.spec.resampled:
            rng = random.Random(_seed_from("resample", self.spec.seed, epoch, self.spec.rank, worker))
            per_worker = max(1, math.ceil(len(self.spec.urls) / (self.spec.world_size * self.spec.slots)))
            return [rng.choice(self.spec.urls) for _ in range(per_worker)]
        order = list(self.spec.urls)
        random.Random(_seed_from("shards", self.spec.seed, epoch)).shuffle(order)
        return order[self.spec.rank :: self.spec.world_size][worker :: self.spec.slots]

    def epoch_samples(self, epoch: int, worker: int) -> Iterator[dict]:
        """The raw (undecoded) samples of one worker-epoch, in shuffled order."""

        def read_all() -> Iterator[dict]:
            for url in self.epoch_shards(epoch, worker):
                yield from read_shard(url, (self.spec.counts or {}).get(url))

        rng = random.Random(_seed_from("buffer", self.spec.seed, epoch, self.spec.rank, worker))
        return shuffle_buffer(read_all(), self.spec.buffer_size, rng)

    # -- one sample ----------------------------------------------------------------------------
    def make_sample(self, raw: dict, seed: int, in_main: bool) -> tuple[dict | None, str | None]:
        image, reason = decode_image_or_reason(raw)
        if image is None:
            return None, reason
        try:
            label = sample_label(raw)
        except (ValueError, UnicodeDecodeError) as err:
            return None, f"malformed cls field ({err})"
        # In the main process the global RNGs belong to the trainer: put them back after the sample.
        with rng_state.preserved(cuda=False) if in_main else contextlib.nullcontext():
            seed_global_rngs(seed)
            try:
                views = self.spec.transform(image)
            except Exception as err:  # an image the augmentations cannot take: skipped and counted like a corrupt one
                return None, f"cannot be transformed ({type(err).__name__}: {err})"
        item = {
            "global_views": views["global_views"],
            "local_views": views.get("local_views", []),
            "key": raw["__key__"],
        }
        if label is not None:
            item["label"] = label
        return item, None

    # -- the loop ------------------------------------------------------------------------------
    def _too_many_skips(self, seen: int, skipped: int, epoch_end: bool) -> bool:
        return skip_rate_exceeded(
            seen, skipped, self.spec.max_skip_rate, self.spec.skip_rate_min_samples, final=epoch_end
        )

    def _abort(self, worker: int, seen: int, skipped: int, last: str, empty: bool = False) -> dict:
        why = (
            f"a whole epoch of rank {self.spec.rank} worker {worker} had no usable sample"
            if empty
            else f"{skipped} of {seen} samples skipped by rank {self.spec.rank} worker {worker} "
            f"({skipped / max(seen, 1):.1%} > data.max_skip_rate={self.spec.max_skip_rate})"
        )
        return {
            "_abort": f"{why}; last: {last}. Fix or re-write the shards (ssl-hybrid shards)"
            + ("" if empty else ", or raise data.max_skip_rate")
        }

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None:  # a worker process of its own: never renice the trainer
            lower_priority(self.spec.worker_nice)
        worker = (physical + self.rotation) % self.spec.slots
        yield from self.iterate_worker(worker, in_main=info is None)

    def iterate_worker(self, worker: int, in_main: bool) -> Iterator[dict]:
        position = self.positions[worker]
        epoch, resume_offset = position["epoch"], position["offset"]
        seen, skipped = position["seen"], position["skipped"]
        batch: list[dict] = []
        last_problem = ""
        while self.spec.epochs is None or epoch < self.spec.epochs:
            read, good = 0, 0
            for offset, raw in enumerate(self.epoch_samples(epoch, worker)):
                read += 1
                if offset < resume_offset:
                    continue  # consumed before the checkpoint: dropped before decoding
                item, reason = self.make_sample(
                    raw, _seed_from("views", self.spec.seed, self.spec.rank, worker, epoch, offset), in_main
                )
                seen += 1
                if item is None:
                    skipped += 1
                    last_problem = f"{raw.get('__url__')} key {raw.get('__key__')}: {reason}"
                    log.warning("skipping sample %s", last_problem)
                    if self._too_many_skips(seen, skipped, epoch_end=False):
                        yield self._abort(worker, seen, skipped, last_problem)
                        return
                    continue
                good += 1
                batch.append(item)
                if len(batch) == self.spec.batch_size:
                    yield self._emit(batch, worker, epoch, offset + 1, seen, skipped)
                    batch = []
            # An epoch without a single usable sample would otherwise loop forever without a batch.
            empty = read == 0 or (good == 0 and resume_offset == 0)
            if empty or self._too_many_skips(seen, skipped, epoch_end=True):
                yield self._abort(worker, seen, skipped, last_problem or "no samples in its shards", empty)
                return
            resume_offset = 0
            epoch += 1
        if batch:
            yield self._emit(batch, worker, epoch, 0, seen, skipped)
        # Finite stream: report the counters of samples skipped after the last batch, too.
        yield {"_meta": {"worker": worker, "epoch": epoch, "offset": 0, "seen": seen, "skipped": skipped}}

    def _emit(self, batch: list[dict], worker: int, epoch: int, offset: int, seen: int, skipped: int) -> dict:
        collated = self.spec.collate(batch)
        collated["_meta"] = {"worker": worker, "epoch": epoch, "offset": offset, "seen": seen, "skipped": skipped}
        return collated


# ---------------------------------------------------------------------------------------------
# The trainer-facing stream
# ---------------------------------------------------------------------------------------------


class TrainStream:
    """An iterable of batches (``global_views``, ``local_views``, ``key``, ``label`` when labeled) whose
    data position can be saved and restored; iterating again continues from the current position."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self.positions = [fresh_position() for _ in range(spec.slots)]
        self.batches = 0
        self.samples = 0

    @property
    def urls(self) -> list[str]:
        return self.spec.urls

    # -- iteration -----------------------------------------------------------------------------
    def _dataset(self) -> ShardStream:
        return ShardStream(self.spec, copy.deepcopy(self.positions), rotation=self.batches % self.spec.slots)

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        extra = {"prefetch_factor": 2} if self.spec.num_workers > 0 else {}
        # Its own generator: DataLoader draws a base seed per iterator, which must not consume the
        # trainer's global torch RNG (augmentations are seeded per sample anyway).
        generator = torch.Generator().manual_seed(_seed_from("loader", self.spec.seed, self.spec.rank) % 2**63)
        loader = wds.WebLoader(
            self._dataset(),
            batch_size=None,
            num_workers=self.spec.num_workers,
            generator=generator,
            worker_init_fn=ignore_stop_signals,
            **extra,
        )
        for batch in loader:
            if "_abort" in batch:
                raise DataQualityError(f"{self.spec.name or 'stream'}: {batch['_abort']}")
            meta = batch.pop("_meta")
            self.positions[meta["worker"]] = {k: meta[k] for k in ("epoch", "offset", "seen", "skipped")}
            if "key" not in batch:  # a finite worker's closing counters, no samples
                continue
            self.batches += 1
            self.samples += len(batch["key"])
            self._check_skip_rate()
            yield batch

    def _check_skip_rate(self) -> None:
        seen, skipped, spec = self.seen, self.skipped, self.spec
        if skip_rate_exceeded(seen, skipped, spec.max_skip_rate, spec.skip_rate_min_samples, final=False):
            raise DataQualityError(
                f"{spec.name or 'stream'}: {skipped} of {seen} samples skipped on rank {spec.rank} "
                f"({skipped / seen:.1%} > data.max_skip_rate={spec.max_skip_rate}); fix the shards or raise it"
            )

    # -- counters --------------------------------------------------------------------------------
    @property
    def seen(self) -> int:
        return sum(p["seen"] for p in self.positions)

    @property
    def skipped(self) -> int:
        return sum(p["skipped"] for p in self.positions)

    @property
    def epoch(self) -> int:
        """The oldest epoch any worker of this rank is still in."""
        return min(p["epoch"] for p in self.positions)

    def stats(self) -> dict:
        seen, skipped = self.seen, self.skipped
        return {
            "seen": seen,
            "skipped": skipped,
            "skip_rate": skipped / seen if seen else 0.0,
            "batches": self.batches,
            "samples": self.samples,
            "epoch": self.epoch,
        }

    # -- checkpointing -------------------------------------------------------------------------
    def _identity(self) -> dict:
        spec = self.spec
        return {
            "seed": spec.seed,
            "rank": spec.rank,
            "world_size": spec.world_size,
            "num_workers": spec.num_workers,
            "batch_size": spec.batch_size,
            "resampled": spec.resampled,
            "num_shards": len(spec.urls),
            "shuffle_buffer": spec.buffer_size,
        }

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            **self._identity(),
            "epoch": self.epoch,
            "batches": self.batches,
            "samples": self.samples,
            "workers": copy.deepcopy(self.positions),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"data position: unknown format {state.get('format')!r} (expected {STATE_FORMAT})")
        mismatched = [
            f"{key} saved {state.get(key)!r}, now {value!r}"
            for key, value in self._identity().items()
            if state.get(key) != value
        ]
        if mismatched:
            raise UserError(
                "data position cannot be resumed exactly: "
                + "; ".join(mismatched)
                + " (use the settings of the interrupted run)"
            )
        self.positions = copy.deepcopy(state["workers"])
        self.batches, self.samples = int(state["batches"]), int(state["samples"])


def build_train_stream(
    data_cfg,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    transform: Callable,
    *,
    num_workers: int | None = None,
    epochs: int | None = None,
    spec: str | None = None,
) -> TrainStream:
    """The training stream of one rank over ``data_cfg.train`` (or ``spec``); see the module doc."""
    from ssl_hybrid.data.views import collate_views

    name = str(spec or data_cfg.train)
    shards = resolve_shard_set(name, data_cfg.allow_pipe_in_lists, folder_channels(data_cfg))
    workers = data_cfg.num_workers if num_workers is None else num_workers
    if batch_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"batch_size must be >= 1 and 0 <= rank < world_size (got {batch_size}, {rank}, {world_size})")
    slots = world_size * max(1, workers)
    if not data_cfg.resampled and len(shards.urls) < slots:
        raise UserError(
            f"{name}: {len(shards.urls)} shards < {world_size} ranks x {max(1, workers)} workers = {slots}; "
            f"exact mode (data.resampled=false) gives each worker whole shards. Write smaller shards "
            f"(ssl-hybrid shards --shard-size), lower data.num_workers, or set data.resampled=true"
        )
    return TrainStream(
        StreamSpec(
            urls=shards.urls,
            counts=shards.counts,
            transform=transform,
            collate=collate_views,
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=workers,
            resampled=data_cfg.resampled,
            buffer_size=data_cfg.shuffle_buffer,
            max_skip_rate=data_cfg.max_skip_rate,
            skip_rate_min_samples=data_cfg.skip_rate_min_samples,
            epochs=epochs,
            worker_nice=resolve_worker_nice(data_cfg.worker_nice),
            name=name,
        )
    )
