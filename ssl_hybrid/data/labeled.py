"""Labeled sets for evaluation: an image folder with class sub-folders or labeled webdataset shards.

Both become a :class:`LabeledSet`: a deterministic, ordered list of samples (stable id, integer label,
where the image bytes live) plus the class names. Shards are indexed once with the package's one tar
reader (:func:`ssl_hybrid.data.shards.tar_members`, keeping member offsets; members grouped by key with
webdataset's ``base_plus_ext``, as the stream does), so a sample is a seek + read away: evaluation needs
random access (samplers, k-shot subsets, retrieval grids) and labeled evaluation sets are small enough to
index, unlike pretraining corpora.

:func:`kshot_indices` draws seeded k-per-class subsets; :func:`save_split` writes their sample ids so a
reported number can be traced back to the exact images it was computed on. :func:`check_images`
decodes every image before extraction and drops (and counts) unreadable ones by the stream's skip rule.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from ssl_hybrid.data.shards import (
    IMAGE_EXTENSIONS,
    IMAGE_KEYS,
    MANIFEST,
    oversized_member,
    parse_label,
    read_manifest,
    tar_members,
    unsafe_member_name,
)
from ssl_hybrid.data.sources import LIST_SUFFIXES, is_url, resolve_shard_set, skip_rate_exceeded
from ssl_hybrid.errors import UserError

log = logging.getLogger(__name__)


class LabeledDataError(UserError):
    """A labeled set that cannot be read: missing folder, no classes, shards without labels."""


@dataclass(frozen=True)
class Sample:
    """One labeled image. ``path`` is a file, or a tar with the image bytes at [offset, offset+size)."""

    id: str
    label: int
    path: str
    offset: int = -1  # -1: ``path`` is the image file itself
    size: int = -1


@dataclass
class LabeledSet:
    source: str
    classes: list[str]
    samples: list[Sample] = field(default_factory=list)
    # Unreadable images dropped by :func:`check_images` ({"id", "path", "reason"}), so reports can count them.
    skipped: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def read_bytes(self, index: int) -> bytes:
        sample = self.samples[index]
        with open(sample.path, "rb") as handle:
            if sample.offset < 0:
                return handle.read()
            handle.seek(sample.offset)
            return handle.read(sample.size)

    def load_image(self, index: int):
        """The decoded RGB PIL image; raises LabeledDataError naming the file when it is unreadable."""
        image, reason = self.decode(index)
        if image is None:
            raise LabeledDataError(f"{self.where(index)}: {reason}")
        return image

    def load_picture(self, index: int):
        """An RGB PIL image to show (grids, thumbnails): the image, or a preview of an N-channel array."""
        import numpy as np

        from ssl_hybrid.data.channels import preview

        image = self.load_image(index)
        return preview(image) if isinstance(image, np.ndarray) else image

    def load_array(self, index: int):
        """The sample as an N-channel array ``[C, H, W]`` (a stored ``.npy``, or a TIFF/PNG file read with
        :func:`ssl_hybrid.data.channels.read_array`); LabeledDataError naming the file when it is unreadable."""
        from ssl_hybrid.data.channels import NPY_MAGIC, decode_npy, read_array
        from ssl_hybrid.data.shards import MAX_IMAGE_PIXELS

        try:
            data = self.read_bytes(index)
            if data[:6] == NPY_MAGIC:
                return decode_npy(data, MAX_IMAGE_PIXELS)
            return read_array(data, Path(self.samples[index].path).name)
        except (OSError, ValueError) as err:
            raise LabeledDataError(f"{self.where(index)}: {err}") from None

    def unreadable(self, index: int, channels: int | None = None) -> str | None:
        """Why the evaluators' loader could not read this sample, None when it can, with the decoder that loader
        uses (:class:`TorchLabeledDataset`): Pillow's RGB decoder for RGB models, :meth:`load_array` for a model
        taking ``channels``-channel arrays (Pillow opens truncated TIFFs tifffile refuses, and a cut OME-TIFF can
        lose its metadata and read as one channel)."""
        if channels is None:
            image, reason = self.decode(index)
            return reason if image is None else None
        try:
            array = self.load_array(index)
        except LabeledDataError as err:  # the message names the file; the caller names it once, with the reason
            return str(err).removeprefix(f"{self.where(index)}: ").removeprefix(f"{Path(self.where(index)).name}: ")
        if array.shape[0] != channels:
            return f"{array.shape[0]} channels (shape {tuple(array.shape)}), the model takes {channels}"
        return None

    def decode(self, index: int):
        """(RGB PIL image, None) or (None, why it is unreadable), with the pretraining stream's decoder."""
        try:
            data = self.read_bytes(index)
        except OSError as err:
            return None, f"cannot be read ({err.strerror or err})"
        return _decode(data, self.samples[index].id)

    def where(self, index: int) -> str:
        """The file of a sample, and its key inside a shard: what an error message should name."""
        sample = self.samples[index]
        return sample.path if sample.offset < 0 else f"{sample.path}: sample '{sample.id}'"

    def subset(self, indices: Iterable[int]) -> LabeledSet:
        return LabeledSet(self.source, self.classes, [self.samples[i] for i in indices], self.skipped)

    def fingerprint(self) -> str:
        """Identifies the content for feature caching: ids, labels, and the files' sizes + mtimes."""
        digest = hashlib.sha256()
        stats: dict[str, tuple[int, int]] = {}
        for sample in self.samples:
            if sample.path not in stats:
                stat = Path(sample.path).stat()
                stats[sample.path] = (stat.st_size, stat.st_mtime_ns)
            digest.update(f"{sample.id}\0{sample.label}\0{stats[sample.path]}\0{sample.offset}\n".encode())
        return digest.hexdigest()[:16]


def _decode(data: bytes, key: str):
    """(RGB image, None) or (None, reason): the stream's decoder, so the corrupt-image policy is the same."""
    from ssl_hybrid.data.channels import TIFF_MAGICS, read_array
    from ssl_hybrid.data.stream import decode_image_or_reason

    image, reason = decode_image_or_reason({"__key__": key, "jpg": data})
    if image is not None:
        return image, None
    if data[:4] in TIFF_MAGICS:  # float32 or odd-layout TIFFs Pillow cannot open: the N-channel reader may
        try:
            return read_array(data, key), None
        except ValueError:
            pass  # Pillow's reason is reported, as for every other unreadable file
    # PIL names its in-memory file ("<_io.BytesIO object at 0x7f...>"): noise next to the real file name.
    return None, re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", reason or "not a readable image")


def check_images(labeled: LabeledSet, max_skip_rate: float | None = None, channels: int | None = None) -> LabeledSet:
    """Decode every image once before any extraction starts, with the loader's own decoder (``channels``: the
    model takes N-channel arrays, see :func:`ssl_hybrid.eval.features.input_channels`; None: RGB); unreadable
    ones are dropped, logged and counted (``skipped``), by the pretraining stream's rule: above
    ``data.max_skip_rate`` of the set (default 10%) is an error naming the count and the first bad file, not a skip.

    A full decode costs well under a second per thousand small images, and it turns a DataLoader worker's
    traceback in the middle of extraction into one clear message before anything runs.
    """
    if max_skip_rate is None:
        from ssl_hybrid.config import DataConfig

        max_skip_rate = DataConfig().max_skip_rate
    skipped = []
    for index in range(len(labeled)):
        reason = labeled.unreadable(index, channels)
        if reason is not None:
            sample = labeled.samples[index]
            skipped.append({"id": sample.id, "path": labeled.where(index), "reason": reason})
    if not skipped:
        return labeled
    rate = len(skipped) / len(labeled)
    first = skipped[0]
    if skip_rate_exceeded(len(labeled), len(skipped), max_skip_rate):
        raise LabeledDataError(
            f"{labeled.source}: {len(skipped)} of {len(labeled)} images are unreadable ({rate:.0%} > "
            f"data.max_skip_rate={max_skip_rate:g}); first: {first['path']}: {first['reason']}"
        )
    for item in skipped[:5]:
        log.warning("skipping unreadable image %s: %s", item["path"], item["reason"])
    log.warning(
        "%s: %d of %d images skipped as unreadable (%.1f%%, limit data.max_skip_rate=%g)",
        labeled.source,
        len(skipped),
        len(labeled),
        100 * rate,
        max_skip_rate,
    )
    bad = {item["id"] for item in skipped}
    return LabeledSet(
        labeled.source, labeled.classes, [s for s in labeled.samples if s.id not in bad], labeled.skipped + skipped
    )


def shared_images(first: LabeledSet, second: LabeledSet) -> int:
    """How many images of ``second`` are also in ``first`` (the same file, or the same bytes of a shard)."""
    seen = {(s.path, s.offset) for s in first.samples}
    return sum((s.path, s.offset) in seen for s in second.samples)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_labeled(spec: str | Path) -> LabeledSet:
    """An image folder with class sub-folders, a shard directory (manifest.json), a .tar, or a brace pattern."""
    spec = str(spec)
    path = Path(spec)
    if path.is_dir() and not (path / MANIFEST).exists() and not list(path.glob("*.tar")):
        return _load_image_folder(path)
    return _load_shards(spec)


UNLABELED = -1  # the label of a sample whose class is unknown (load_images)


def load_images(spec: str | Path) -> LabeledSet:
    """Any image collection, labeled or not: what :func:`load_labeled` reads (in its order, so rows match
    the evaluators'), plus a folder of images without class sub-folders, shards without 'cls', a text list
    of images (one path per line, optionally '<TAB>class', as ``ssl-hybrid shards`` reads it) and a single
    image file. Unlabeled samples carry ``UNLABELED``; ``classes`` is empty when nothing is labeled."""
    from ssl_hybrid.data.shards import collect_folder, collect_list

    spec = str(spec)
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        return LabeledSet(spec, [], [Sample(id=spec, label=UNLABELED, path=str(path))])
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return _from_source(collect_list(path), spec)
    if path.is_dir() and not (path / MANIFEST).exists() and not list(path.glob("*.tar")):
        source = collect_folder(path, labels="auto")
        if source.classes:
            return _load_image_folder(path)
        if not source.items:
            raise LabeledDataError(f"{path}: holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return _from_source(source, spec)
    from ssl_hybrid.config import DEFAULT_CORPUS

    if not path.exists() and "{" not in spec and "::" not in spec and spec.rstrip("/") != DEFAULT_CORPUS:
        raise LabeledDataError(f"{spec}: not found (expected an image folder, shards, an image list or an image)")
    return _load_shards(spec, require_labels=False)


def _from_source(source, spec: str) -> LabeledSet:
    """A LabeledSet from ``ssl_hybrid.data.shards``' collected source (folder or list), ids = relative paths."""
    if not source.items:
        raise LabeledDataError(f"{spec}: names no images")
    index = {name: i for i, name in enumerate(source.classes or [])}
    samples = [
        Sample(id=item.relative, label=index.get(item.class_name, UNLABELED), path=str(item.path))
        for item in source.items
    ]
    return LabeledSet(spec, list(source.classes or []), samples)


def _load_image_folder(root: Path) -> LabeledSet:
    """Class sub-folders in sorted order; a class folder without images is left out with a warning (no
    evaluator could use it, and it would count as a class no query can belong to)."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise LabeledDataError(f"{root}: no class sub-folders (expected <root>/<class>/<image>)")
    files = {
        name: [f for f in sorted((root / name).rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        for name in folders
    }
    classes = [name for name in folders if files[name]]
    if not classes:
        raise LabeledDataError(f"{root}: class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    empty = [name for name in folders if not files[name]]
    if empty:
        log.warning(
            "%s: class folder%s %s hold%s no images: left out",
            root,
            "s" if len(empty) > 1 else "",
            ", ".join(repr(name) for name in empty),
            "" if len(empty) > 1 else "s",
        )
    samples = [
        Sample(id=file.relative_to(root).as_posix(), label=label, path=str(file))
        for label, name in enumerate(classes)
        for file in files[name]
    ]
    return LabeledSet(str(root), classes, samples)


def _resolve_shards(spec: str) -> tuple[list[str], list[str] | None]:
    """Shard paths (the stream's resolver, so both read the same shards) and the class names of their manifest:
    the spec's own, else the one beside the shards of a pattern or list (None when there is none)."""
    shards = resolve_shard_set(spec)
    if shards.counts is not None or not shards.urls or is_url(shards.urls[0]):
        return shards.urls, shards.classes
    beside = Path(shards.urls[0]).parent
    classes = read_manifest(beside).get("classes") if (beside / MANIFEST).exists() else None
    return shards.urls, classes


def _load_shards(spec: str, require_labels: bool = True) -> LabeledSet:
    """``require_labels=False`` keeps samples without 'cls' (label ``UNLABELED``): ``load_images``."""
    urls, classes = _resolve_shards(spec)
    if not urls:
        raise LabeledDataError(f"{spec}: not an image folder, and no shards found there")
    samples: list[Sample] = []
    names_by_label: dict[int, str] = {}
    for url in urls:
        if is_url(url) or not Path(url).is_file():  # never gopen a command or URL
            raise LabeledDataError(f"{url}: shard not found (labeled sets are read from local files)")
        samples.extend(_index_tar(url, names_by_label, require_labels))
    if not samples:
        raise LabeledDataError(
            f"{spec}: shards hold no labeled images (need an image and a 'cls' per sample)"
            if require_labels
            else f"{spec}: shards hold no images"
        )
    if not classes:
        count = max(s.label for s in samples) + 1
        classes = [names_by_label.get(i, str(i)) for i in range(count)]
    bad = [s.id for s in samples if not 0 <= s.label < len(classes) and (require_labels or s.label != UNLABELED)]
    if bad:
        raise LabeledDataError(f"{spec}: sample '{bad[0]}' has label outside the {len(classes)} classes")
    return LabeledSet(spec, [str(c) for c in classes], samples)


_READ_WHILE_INDEXING = ("cls", "json")  # small fields read during the one pass; the image is only located


def _index_tar(url: str, names_by_label: dict[int, str], require_labels: bool = True) -> list[Sample]:
    """One pass over a tar (seekable, so the image offsets stay valid): group members by webdataset key,
    in order of first appearance."""
    from webdataset.tariterators import base_plus_ext  # webdataset imports torch: only when reading shards

    groups: dict[str, dict[str, tarfile.TarInfo | bytes]] = {}
    try:
        for member, read in tar_members(url, mode="r:"):
            problem = unsafe_member_name(member.name)
            if problem:
                log.warning("%s: %s skipped", url, problem)
                continue
            key, ext = base_plus_ext(member.name)
            if key is None:  # no extension: a group without image, skipped below with a warning
                key, ext = member.name, ""
            ext = ext.lower()
            too_large = oversized_member(member, ext)
            if too_large:  # never read (here or later): the sample is skipped below with a warning
                groups.setdefault(key, {})["__error__"] = too_large.encode()
                continue
            groups.setdefault(key, {})[ext] = read() if ext in _READ_WHILE_INDEXING else member
    except tarfile.TarError as err:
        raise LabeledDataError(f"{url}: unreadable tar shard ({err})") from None
    samples = (_sample_from_group(url, key, fields, names_by_label, require_labels) for key, fields in groups.items())
    return [sample for sample in samples if sample is not None]


def _sample_from_group(
    url: str,
    key: str,
    fields: dict[str, tarfile.TarInfo | bytes],
    names_by_label: dict[int, str],
    require_label: bool = True,
) -> Sample | None:
    # Image members are indexed (TarInfo); the small fields and the error note were read while indexing (bytes).
    image = next((fields[k] for k in IMAGE_KEYS if k in fields), None)
    if "__error__" in fields:
        log.warning("%s: sample '%s' skipped (%s)", url, key, cast(bytes, fields["__error__"]).decode())
        return None
    if not isinstance(image, tarfile.TarInfo) or ("cls" not in fields and require_label):
        log.warning("%s: sample '%s' skipped (needs an image%s)", url, key, " and a 'cls'" if require_label else "")
        return None
    if "cls" not in fields:
        return Sample(id=key, label=UNLABELED, path=url, offset=image.offset_data, size=image.size)
    try:
        label = parse_label(cast(bytes, fields["cls"]))
    except (ValueError, UnicodeDecodeError) as err:
        log.warning("%s: sample '%s' skipped ('cls' is not a class index: %s)", url, key, err)
        return None
    if "json" in fields:
        try:
            meta = json.loads(cast(bytes, fields["json"]))
            if isinstance(meta, dict) and "class_name" in meta:
                names_by_label.setdefault(label, str(meta["class_name"]))
        except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, or nested deeper than the decoder goes
            log.warning(
                "%s: sample '%s': its 'json' is not valid JSON (%s); the sample is kept, its class_name "
                "is ignored (the class is named by another sample's json, else by its number)",
                url,
                key,
                err,
            )
    return Sample(id=key, label=label, path=url, offset=image.offset_data, size=image.size)


# ---------------------------------------------------------------------------------------------
# k-shot subsets
# ---------------------------------------------------------------------------------------------


def kshot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` samples per class drawn without replacement; the same (labels, shots, seed) -> same indices.

    Each class draws from its own generator seeded by (seed, class), so adding or dropping a class never
    changes the other classes' picks. A class with fewer than ``shots`` samples is an error, not a silent
    smaller subset (the reported "k-shot" would be a lie).
    """
    labels = np.asarray(labels)
    if shots < 1:
        raise LabeledDataError(f"shots must be >= 1, got {shots}")
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < shots:
        label, count = classes[counts < shots][0], counts.min()
        raise LabeledDataError(
            f"class {label} has {counts[classes == label][0]} training samples, fewer than {shots} "
            f"shots; the smallest class has {count}: use at most {count} shots or add images"
        )
    picked = []
    for label in classes:
        members = np.flatnonzero(labels == label)
        rng = np.random.default_rng([seed, int(label)])
        picked.append(np.sort(rng.choice(members, size=shots, replace=False)))
    return np.sort(np.concatenate(picked))


def save_split(path: str | Path, labeled: LabeledSet, indices: Sequence[int], **meta) -> Path:
    """Write the subset's sample ids and labels (plus ``meta`` such as shots and seed) as JSON."""
    from ssl_hybrid.runs import write_json_atomic

    payload = dict(
        meta,
        source=labeled.source,
        ids=[labeled.samples[i].id for i in indices],
        labels=[labeled.samples[i].label for i in indices],
    )
    return write_json_atomic(path, payload)


def split_indices_by_ids(labeled: LabeledSet, ids: Sequence[str]) -> np.ndarray:
    """Indices of the given ids (e.g. read back from a saved split); unknown ids are an error."""
    position = {sample.id: i for i, sample in enumerate(labeled.samples)}
    missing = [i for i in ids if i not in position]
    if missing:
        raise LabeledDataError(f"{labeled.source}: split names unknown sample '{missing[0]}'")
    return np.array([position[i] for i in ids], dtype=np.int64)


class TorchLabeledDataset:
    """Map-style torch dataset over a LabeledSet: returns (transformed image, label, index)."""

    def __init__(self, labeled: LabeledSet, transform: Callable):
        self.labeled = labeled
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labeled)

    def __getitem__(self, index: int):
        # N-channel transforms take the array itself: PIL would read a 5-channel TIFF as 8-bit RGB
        wants_array = getattr(self.transform, "takes_arrays", False)
        image = self.labeled.load_array(index) if wants_array else self.labeled.load_image(index)
        if not wants_array and isinstance(image, np.ndarray):
            raise LabeledDataError(
                f"{self.labeled.where(index)}: a {image.dtype} image of {image.shape[0]} channels; this backbone "
                "takes RGB images (pretrain with data.channels on shards written by ssl-hybrid shards --channels)"
            )
        try:
            pixels = self.transform(image)
        except Exception as err:  # e.g. an image too small for the crop: name the file, not the worker
            raise LabeledDataError(
                f"{self.labeled.where(index)}: cannot be transformed ({type(err).__name__}: {err})"
            ) from None
        return pixels, self.labeled.samples[index].label, index


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (fit, held_out): about ``fraction`` of each class held out, at least one per
    class when the class has >= 2 samples (classes with one sample stay entirely in ``fit``)."""
    labels = np.asarray(labels)
    fit, held = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng = np.random.default_rng([seed, int(label), 1])
        members = rng.permutation(members)
        n_held = 0 if len(members) < 2 else min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        held.append(members[:n_held])
        fit.append(members[n_held:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def align_classes(train: LabeledSet, test: LabeledSet) -> LabeledSet:
    """``test`` relabeled to ``train``'s class indices by class name (folders may list classes differently);
    a test class absent from train is an error, since no k-NN or probe could ever predict it."""
    if test.classes == train.classes:
        return test
    index = {name: i for i, name in enumerate(train.classes)}
    unknown = [name for name in test.classes if name not in index]
    if unknown:
        raise LabeledDataError(f"{test.source}: class '{unknown[0]}' does not occur in the training set {train.source}")
    samples = [Sample(s.id, index[test.classes[s.label]], s.path, s.offset, s.size) for s in test.samples]
    return LabeledSet(test.source, list(train.classes), samples)
