"""Frozen-feature extraction: ``extract_features(backbone, loader) -> (float32 [N, C], labels [N])``.

Batched under ``torch.inference_mode`` with AMP on GPUs. Under Accelerate with several processes the
loader is sharded and padded so every rank runs the same number of batches; each batch carries its
sample indices, so after the gather the padded duplicates are dropped and rows land at their index:
the bank has exactly N rows, in dataset order, whatever the number of processes.

Features or logits that are not finite (NaN/inf: a diverged or broken backbone) are refused with one line
naming the backbone, on every rank alike (the check runs on the gathered batch), never scored.

Features are cached on disk keyed by everything that changes the forward (backbone content hash, data
fingerprint, transform, pooling, autocast dtype), so a second k-NN / linear / few-shot evaluation of the
same backbone on the same data does not re-extract. Rank 0 alone reads the cache and broadcasts what it
found; an unreadable, corrupt or mismatching entry is a logged miss, a failed write a logged warning. The
cache keeps at most ``$SSL_HYBRID_CACHE_MAX_GB`` (default 10) GiB: the least recently used entries go first.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

from ssl_hybrid.config import POOLINGS, EvalConfig
from ssl_hybrid.data.labeled import LabeledSet, TorchLabeledDataset
from ssl_hybrid.data.workers import ignore_stop_signals
from ssl_hybrid.errors import UserError
from ssl_hybrid.models.contract import EVAL_CROP_PCT, TimmModel
from ssl_hybrid.models.pooling import multiscale_embed, offers_multiscale

log = logging.getLogger(__name__)

# Bump when the stored entry or the meaning of its key changes: older entries then simply miss.
CACHE_FORMAT = "ssl_hybrid-features/2"
DEFAULT_CACHE_MAX_GB = 10.0


class NonFiniteError(UserError):
    """A backbone whose features (or a classifier whose logits) contain NaN or inf."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("SSL_HYBRID_CACHE", Path.home() / ".cache" / "ssl_hybrid")) / "features"


# The resize's longer side is at most this many times its shorter one: a 1 x 100,000 px strip (a few hundred
# bytes of PNG) would otherwise become 110 x 11,000,000 px (3.6 GB) before the centre crop keeps 96 x 96 of it.
MAX_RESIZE_ASPECT = 16


class BoundedResize(T.Resize):
    """``T.Resize(side)`` (shorter side to ``side``) whose longer side never exceeds ``max_size``: beyond it the
    longer side is ``max_size`` and the shorter one what the aspect ratio leaves, at least 1 px (torchvision's own
    ``max_size`` asks PIL for a 0-px side there and fails). Images within the bound resize exactly as T.Resize."""

    def forward(self, image):
        width, height = image.size
        if int(self.size * max(width, height) / max(1, min(width, height))) <= self.max_size:
            return super().forward(image)
        scale = self.max_size / max(width, height)
        return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)


def eval_transform(image_size: int, mean=None, std=None, crop_pct: float | None = None):
    """Resize (shorter side to size / crop_pct, bicubic; the longer side bounded, :class:`BoundedResize`) +
    center crop + ImageNet normalization: timm's evaluation transform with the crop_pct of our models'
    pretrained_cfg, except that the resize side is rounded where timm's ``create_transform`` floors it (110 px
    rather than 109 at 96 px): every committed evaluation number was measured with the rounded side.
    ``mean``/``std``/``crop_pct``: a model folder's own values (``predict``), when it records others."""
    side = int(round(image_size / (crop_pct or EVAL_CROP_PCT)))
    return T.Compose(
        [
            BoundedResize(side, interpolation=T.InterpolationMode.BICUBIC, max_size=MAX_RESIZE_ASPECT * side),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean or IMAGENET_DEFAULT_MEAN, std or IMAGENET_DEFAULT_STD),
        ]
    )


def transform_for(meta: dict[str, Any], image_size: int, crop_pct: float | None = None):
    """The evaluation transform of a backbone (``load_backbone_spec``'s meta or a model folder's record): today's
    RGB one, or, for a model pretrained on N-channel data, :class:`ssl_hybrid.data.channels.ArrayEvalTransform`
    with the pretraining data's per-channel statistics."""
    from ssl_hybrid.data.channels import ArrayEvalTransform, Normalization

    norm = Normalization.from_record(meta.get("normalization"))
    if norm is None:
        return eval_transform(image_size, crop_pct=crop_pct)
    return ArrayEvalTransform(image_size, norm, crop_pct or EVAL_CROP_PCT)


def input_channels(meta: dict[str, Any]) -> int | None:
    """The channel count of the arrays :func:`transform_for` hands this backbone, None for RGB images: the
    loader's decoder, which ``check_images(channels=)`` must use too."""
    from ssl_hybrid.data.channels import Normalization

    norm = Normalization.from_record(meta.get("normalization"))
    return None if norm is None else norm.channels


def make_loader(
    labeled: LabeledSet,
    transform,
    batch_size: int,
    num_workers: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        # map-style (__len__ + __getitem__) is all DataLoader needs; data.labeled stays free of torch imports
        cast(torch.utils.data.Dataset, TorchLabeledDataset(labeled, transform)),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=ignore_stop_signals,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


def autocast_context(device: torch.device):
    """The autocast of feature extraction (``device.inference_precision``: none on CPU)."""
    from ssl_hybrid.device import autocast, inference_precision

    return autocast(device, inference_precision(device))


def embed(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The pooled, pre-logits feature every timm model (and ours) exposes."""
    model = cast(TimmModel, backbone)
    return model.forward_head(model.forward_features(images), pre_logits=True)  # [B, C]


# "multiscale": every stage of the backbone's pyramid pooled and L2-normalized, concatenated (the backbone's
# own ``forward_multiscale`` where it has one; a timm CNN's stage maps at strides >= 4 otherwise);
# "default": the model's own pooled pre-logits feature. Backbones without a pyramid (plain ViTs) use "default".
# POOLINGS (the choices) and the default (EvalConfig.pooling) live in ssl_hybrid.config.


def pooling_forward(backbone: torch.nn.Module, pooling: str):
    """The ``forward(model, images)`` that extracts ``pooling`` features; "multiscale" falls back to
    "default" for backbones without a pyramid."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return multiscale_embed if pooling == "multiscale" and offers_multiscale(backbone) else embed


def resolved_pooling(backbone: torch.nn.Module, pooling: str) -> str:
    return "multiscale" if pooling_forward(backbone, pooling) is multiscale_embed else "default"


def worker_error_line(text: str) -> str:
    """The original message of an error torch re-raised from a DataLoader worker ("Caught X in DataLoader
    worker process 0. Original Traceback ... module.X: <message>"): its last line, without the type."""
    if "DataLoader worker" not in text.split("\n", 1)[0]:
        return text
    last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), text)
    head, sep, rest = last.partition(": ")
    return rest if sep and " " not in head else last


@contextlib.contextmanager
def one_line_worker_errors(iterator=None):
    """User errors raised inside DataLoader workers (an unreadable image) reach the user as the worker's
    one-line message naming the file, not as torch's wrapped traceback; other errors pass unchanged.

    ``iterator`` (the loader's): its workers are joined before the error propagates. Left to be killed at
    exit, workers that shared tensors leave multiprocessing's ``pymp-*`` folders in the temp directory."""
    from ssl_hybrid.errors import UserError

    try:
        yield
    except UserError as err:
        line = worker_error_line(str(err))
        if line == str(err):
            raise
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process loader iterator
        if shutdown is not None:
            shutdown()
        raise type(err)(line) from None


@torch.inference_mode()
def extract_features(
    backbone: torch.nn.Module,
    loader,
    accelerator=None,
    progress: bool = False,
    forward=embed,
    name: str = "the backbone",
    what: str = "features",
) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [N, C], labels int64 [N]) in dataset order, exactly N rows.

    ``loader`` yields (images, labels, indices). With an ``accelerate.Accelerator`` the loader is
    prepared (sharded + padded) and results gathered across processes; every process gets the full arrays.
    ``forward(model, images) -> [B, C]`` defaults to the pooled features (the fine-tuner passes logits).
    A non-finite output raises NonFiniteError naming ``name`` (the backbone) and ``what`` was extracted.
    """
    n = len(loader.dataset)
    labeled = getattr(loader.dataset, "labeled", None)  # a TorchLabeledDataset names its files
    where = labeled.where if labeled is not None else (lambda index: f"sample {index}")
    device = accelerator.device if accelerator is not None else next(backbone.parameters()).device
    backbone = backbone.to(device).eval()
    if accelerator is not None and accelerator.num_processes > 1:
        loader = accelerator.prepare_data_loader(loader)
    features: np.ndarray | None = None
    labels = np.full(n, -1, dtype=np.int64)
    filled = np.zeros(n, dtype=bool)
    batches = iterator = iter(loader)
    if progress:
        from tqdm import tqdm

        batches = tqdm(
            iterator,
            total=len(loader),
            desc="features",
            unit="batch",
            leave=False,
            disable=accelerator is not None and not accelerator.is_main_process,
        )
    with one_line_worker_errors(iterator):
        for images, batch_labels, indices in batches:
            with autocast_context(device):
                out = forward(backbone, images.to(device, non_blocking=True)).float()  # [B, C]
            batch_labels, indices = batch_labels.to(device), indices.to(device)
            if accelerator is not None and accelerator.num_processes > 1:
                # Plain gather (not gather_for_metrics): we drop duplicates ourselves, by index.
                out, batch_labels, indices = accelerator.gather((out.contiguous(), batch_labels, indices))
            out_np, idx = out.cpu().numpy(), indices.cpu().numpy()
            check_finite(out_np, idx, name, what, where)  # on the gathered batch: every rank decides alike
            if features is None:
                features = np.zeros((n, out_np.shape[1]), dtype=np.float32)
            features[idx] = out_np  # duplicates of padded samples overwrite their identical twin
            labels[idx] = batch_labels.cpu().numpy()
            filled[idx] = True
    if features is None or not filled.all():
        raise RuntimeError(f"feature extraction covered {int(filled.sum())} of {n} samples")
    return features, labels


def check_finite(rows: np.ndarray, indices: np.ndarray, name: str, what: str, where) -> None:
    """Refuse NaN/inf outputs: scored, they give a chance-like k-NN and a 100% top-1 from argmax ties.
    ``where(index)`` names a sample (its file)."""
    bad = ~np.isfinite(rows).all(axis=tuple(range(1, rows.ndim)))
    if bad.any():
        raise NonFiniteError(
            f"{name}: its {what} are not finite (NaN or inf) for {int(bad.sum())} of the "
            f"{len(rows)} images of a batch (first: {where(int(indices[bad][0]))}); its weights "
            "or forward pass are broken (a diverged run?): evaluate an earlier checkpoint"
        )


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def cache_key(backbone_hash: str, labeled: LabeledSet, transform_desc: str) -> str:
    digest = hashlib.sha256(f"{CACHE_FORMAT}\n{backbone_hash}\n{labeled.fingerprint()}\n{transform_desc}".encode())
    return digest.hexdigest()[:24]


def forward_desc(image_size: int, transform, pooled: str, device: torch.device) -> str:
    """Everything besides the weights and the data that changes the extracted features."""
    autocast = autocast_context(device)
    dtype = autocast.fast_dtype if isinstance(autocast, torch.autocast) else torch.float32
    return f"eval:{image_size}:{transform!r}:pooling={pooled}:{device.type}:{dtype}"


def cache_max_bytes() -> int:
    text = os.environ.get("SSL_HYBRID_CACHE_MAX_GB", str(DEFAULT_CACHE_MAX_GB))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise UserError(f"SSL_HYBRID_CACHE_MAX_GB must be a number of GiB >= 0, got '{text}'")
    return int(value * 2**30)


def read_entry(path: Path, key: str, labeled: LabeledSet) -> tuple[np.ndarray, np.ndarray] | None:
    """The stored (features, labels) when ``path`` holds them for ``labeled``; None (a miss) otherwise.
    An entry must say it is ``key`` and match the set's size and labels, with finite float32 features."""
    if not path.exists():
        return None
    try:
        with np.load(path) as stored:
            features, labels, stored_key = stored["features"], stored["labels"], str(stored["key"])
    except Exception as err:  # truncated, not a zip, missing arrays, unreadable: the cache is only a cache
        log.warning("feature cache entry %s is unreadable (%s: %s): extracting again", path, type(err).__name__, err)
        return None
    problem = (
        f"it is entry {stored_key[:24]}"
        if stored_key != key
        else f"{features.dtype} {features.shape} features for {len(labeled)} images"
        if features.dtype != np.float32 or features.ndim != 2 or len(features) != len(labeled)
        else "its labels differ from the set's"
        if not np.array_equal(labels, labeled.labels)
        else "its features are not finite"
        if not np.isfinite(features).all()
        else None
    )
    if problem:
        log.warning(
            "feature cache entry %s does not hold the features of %s (%s): extracting again",
            path,
            labeled.source,
            problem,
        )
        return None
    with contextlib.suppress(OSError):  # a read-only cache still serves
        os.utime(path)  # the eviction order is least recently used
    return features, labels


def write_entry(path: Path, key: str, features: np.ndarray, labels: np.ndarray, max_bytes: int) -> None:
    """Write atomically (a crash leaves no half entry); a failure (full disk, read-only) is only logged."""
    from ssl_hybrid.runs import atomic_path

    try:
        with atomic_path(path) as tmp:
            np.savez(tmp, features=features, labels=labels, key=np.array(key))
    except Exception as err:  # whatever the writer raises: the features are in memory and still returned
        log.warning(
            "cannot write the feature cache entry %s (%s: %s); continuing without it", path, type(err).__name__, err
        )
        return
    evict(path.parent, max_bytes, keep=path)


def evict(folder: Path, max_bytes: int, keep: Path) -> None:
    """Delete the least recently used entries until the folder holds at most ``max_bytes`` (``keep`` stays)."""
    entries = []
    for entry in folder.glob("*.npz"):
        try:
            stat = entry.stat()
        except OSError:  # removed by another process meanwhile
            continue
        if not entry.name.startswith("."):
            entries.append((stat.st_mtime, stat.st_size, entry))
    total = sum(size for _, size, _ in entries)
    for _, size, entry in sorted(entries, key=lambda e: e[:2]):
        if total <= max_bytes:
            break
        if entry != keep:
            entry.unlink(missing_ok=True)
            total -= size
            log.info("feature cache over %.1f GiB: removed the least recently used entry %s", max_bytes / 2**30, entry)


def from_main_process(accelerator, value):
    """Rank 0's ``value`` on every rank (what rank 0 found in its cache decides for all; multi-node safe)."""
    if accelerator is None or accelerator.num_processes <= 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def cached_features(
    backbone: torch.nn.Module,
    meta: dict[str, Any],
    labeled: LabeledSet,
    image_size: int,
    batch_size: int = EvalConfig.batch_size,
    num_workers: int = 0,
    cache_dir: Path | None = None,
    accelerator=None,
    progress: bool = False,
    pooling: str = EvalConfig.pooling,
) -> tuple[np.ndarray, np.ndarray]:
    """Features of ``labeled`` under the eval transform at ``image_size``, from the cache when present.

    ``cache_dir=None`` disables the cache. ``meta["hash"]`` (from load_backbone_spec) keys the backbone.
    ``pooling``: one of POOLINGS (multiscale where the backbone offers it, else its default pooling).
    """
    transform = transform_for(meta, image_size)
    forward = pooling_forward(backbone, pooling)
    pooled = resolved_pooling(backbone, pooling)
    name = meta.get("spec") or "the backbone"
    is_main = accelerator is None or accelerator.is_main_process
    path = key = None
    if cache_dir is not None:
        max_bytes = cache_max_bytes()
        device = accelerator.device if accelerator is not None else next(backbone.parameters()).device
        key = cache_key(
            meta.get("hash") or _hash_of(backbone), labeled, forward_desc(image_size, transform, pooled, device)
        )
        path = Path(cache_dir) / f"{key}.npz"
        found = from_main_process(accelerator, read_entry(path, key, labeled) if is_main else None)
        if found is not None:
            log.info("features from cache %s (%d x %d)", path, *found[0].shape)
            return found
    start = time.perf_counter()
    loader = make_loader(labeled, transform, batch_size, num_workers)
    features, labels = extract_features(backbone, loader, accelerator, progress=progress, forward=forward, name=name)
    log.info(
        "extracted %d x %d %s-pooled features from %s in %.1fs",
        *features.shape,
        pooled,
        labeled.source,
        time.perf_counter() - start,
    )
    if path is not None and key is not None and is_main:
        write_entry(path, key, features, labels, max_bytes)
    return features, labels


def _hash_of(backbone: torch.nn.Module) -> str:
    from ssl_hybrid.eval.backbones import model_hash

    return model_hash(backbone)


def eval_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that prints and writes files after a collective extraction.
    Accelerate's ``PartialState`` reads the launcher's environment (the state the evaluators' Accelerator shares)."""
    from ssl_hybrid.device import process_state

    return process_state().is_main_process


def distributed_accelerator():
    """An Accelerator when launched with several processes (accelerate launch / torchrun), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from ssl_hybrid.device import make_accelerator

    return make_accelerator()


def features_for_spec(
    spec: str,
    sets: list[LabeledSet],
    image_size: int | None = None,
    batch_size: int = EvalConfig.batch_size,
    num_workers: int = 0,
    cache_dir: Path | None = None,
    progress: bool = False,
    pooling: str = EvalConfig.pooling,
) -> tuple[dict[str, Any], list[tuple[np.ndarray, np.ndarray]]]:
    """Load a backbone spec and return (meta, [(features, labels) per set]); image_size None = the backbone's.
    ``meta["pooling"]`` records the pooling actually used."""
    from ssl_hybrid.eval.backbones import load_backbone_spec

    model, meta = load_backbone_spec(spec, image_size=image_size or None)
    accelerator = distributed_accelerator()
    if accelerator is None:
        model = model.to(eval_device())
    size = int(meta["image_size"])
    meta["pooling"] = resolved_pooling(model, pooling)
    outputs = [
        cached_features(model, meta, labeled, size, batch_size, num_workers, cache_dir, accelerator, progress, pooling)
        for labeled in sets
    ]
    return meta, outputs
