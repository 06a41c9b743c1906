"""Write webdataset tar shards from an image folder or a text list of images.

Shard format (``ssl_hybrid-shards/1``; other stages read it, so it does not change):

- ``<prefix>-000000.tar``, ``<prefix>-000001.tar``... written with :class:`webdataset.ShardWriter`;
- each sample: ``__key__`` (the source path relative to the source root, without its extension, ``.``
  replaced by ``_``: stable and unique), the image under its original extension (``jpg``/``png``/...;
  re-encoded ``jpg`` when ``max_side`` is set) and, for labeled sources, ``cls`` (index into the sorted
  class names) and ``json`` (``{"class_name": ..., "source": <relative path>}``);
- ``manifest.json``: format, source, num_samples, shards (name, samples, sha256), classes (or null),
  skipped (path + reason) and shard_size; labeled output also gets ``classes.json``.

The whole set is written into a temporary folder next to the output and swapped in when complete
(``runs.replace_dir``): interrupting a run, or a run that fails, leaves a previous output as it was, and
readers never see a mix of two runs. The output folder is replaced as a whole, so it may hold only a previous
shard set (anything else is refused).
"""

from __future__ import annotations

import collections
import functools
import glob
import hashlib
import io
import json
import logging
import os
import random
import re
import secrets
import shutil
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import IO, Literal, cast

from ssl_hybrid.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "ssl_hybrid-shards/1"
MANIFEST = "manifest.json"
CLASSES = "classes.json"
# The one image-extension list: image files in folders and lists, and (without the dot, in this order of
# preference) the image field of a shard sample, for the stream and the labeled sets alike.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
# ``npy``: an N-channel array stored by ``--channels`` (:mod:`ssl_hybrid.data.channels`).
IMAGE_KEYS = tuple(extension.lstrip(".") for extension in IMAGE_EXTENSIONS) + ("npy",)
# PIL's own default (about 89 Mpx); an image declaring more pixels is refused before decoding.
MAX_IMAGE_PIXELS = 89_478_485
# Tar members are read whole, so a shard from elsewhere could ask for any amount of memory: a larger member is
# refused unread (its sample skipped and counted). 1 GiB holds any image within MAX_IMAGE_PIXELS even stored raw
# (89 Mpx x 4 channels x 16 bit = 716 MB); the sidecars the tool parses (cls, json) are a few bytes.
MAX_MEMBER_BYTES = 1 << 30
MAX_SIDECAR_BYTES = 1 << 20
SIDECAR_KEYS = ("cls", "json")
# A label is a class index; more classes than the largest common label sets (ImageNet-21k: 21,841) by far means a
# malformed 'cls', not a dataset: a class list and k-NN scores are sized by it.
MAX_CLASSES = 100_000
_TMP_PREFIX = ".partial-"
# What a shard set's folder holds; anything else in an output folder is not ours to replace.
_OUTPUT_FILE = re.compile(rf"(?:{re.escape(_TMP_PREFIX)})?.+-\d{{6}}\.tar|{re.escape(MANIFEST)}|{re.escape(CLASSES)}")


class ShardWriteError(UserError):
    """The source cannot be turned into shards (missing, empty, unreadable list)."""


@dataclass
class SourceItem:
    path: Path  # absolute path of the image file
    relative: str  # path relative to the source root (or as written in the list file)
    class_name: str | None = None


@dataclass
class Source:
    root: Path
    items: list[SourceItem]
    classes: list[str] | None
    skipped: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Collecting the source files
# ---------------------------------------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _walk_files(root: Path, skipped: list[dict]) -> list[Path]:
    """All regular files under root, sorted; symlinks that leave root are skipped, not followed."""
    found: list[Path] = []
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames):
            sub = Path(directory) / name
            if sub.is_symlink():  # os.walk does not descend into it; say so rather than drop it silently
                skipped.append({"path": sub.relative_to(root).as_posix(), "reason": "symlinked directory not followed"})
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(directory) / name
            if name.startswith("."):
                continue
            if path.is_symlink() and not _inside(path, root):
                skipped.append(
                    {"path": path.relative_to(root).as_posix(), "reason": "symlink leaves the source folder"}
                )
                continue
            found.append(path)
    return found


def _label_from_regex(regex: re.Pattern, name: str) -> str | None:
    match = regex.search(name)
    if not match:
        return None
    return match.group(1) if match.groups() else match.group(0)


def collect_folder(root: Path, labels: str = "auto", label_regex: str | None = None) -> Source:
    """labels: auto (class sub-folders if every image is inside one), folders, or none."""
    skipped: list[dict] = []
    files = _walk_files(root, skipped)
    items: list[SourceItem] = []
    for path in files:
        relative = path.relative_to(root).as_posix()
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append({"path": relative, "reason": f"not an image extension ({path.suffix or 'none'})"})
            continue
        items.append(SourceItem(path=path, relative=relative))
    if label_regex:
        regex = re.compile(label_regex)
        kept = []
        for item in items:
            item.class_name = _label_from_regex(regex, Path(item.relative).name)
            if item.class_name is None:
                skipped.append(
                    {"path": item.relative, "reason": f"file name does not match --label-regex {label_regex!r}"}
                )
            else:
                kept.append(item)
        items = kept
    else:
        top_level = [item for item in items if "/" not in item.relative]
        use_folders = labels == "folders" or (labels == "auto" and items and not top_level)
        if labels == "folders" and top_level:
            raise ShardWriteError(f"{root}: --labels folders, but {top_level[0].relative} is not inside a class folder")
        if use_folders:
            for item in items:
                item.class_name = item.relative.split("/", 1)[0]
    classes = sorted(_class_names(items)) if items and items[0].class_name is not None else None
    return Source(root=root, items=items, classes=classes, skipped=skipped)


def _class_names(items: list[SourceItem]) -> set[str]:
    """The class names of ``items`` (the callers check first that every item has one)."""
    return {item.class_name for item in items if item.class_name is not None}


def collect_list(list_file: Path) -> Source:
    """A text file: one image path per line, optionally '<TAB>class name'; relative paths are relative
    to the list file's folder; blank lines and lines starting with '#' are ignored."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ShardWriteError(f"{list_file}: cannot read the image list ({err})") from None
    root = list_file.resolve().parent
    items: list[SourceItem] = []
    skipped: list[dict] = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path_text, _, class_name = line.rstrip("\n").partition("\t")
        path = Path(path_text.strip())
        path = path if path.is_absolute() else root / path
        relative = os.path.relpath(path, root).replace(os.sep, "/")
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append({"path": relative, "reason": f"line {number}: not an image extension"})
            continue
        items.append(SourceItem(path=path, relative=relative, class_name=class_name.strip() or None))
    labeled = [item.class_name is not None for item in items]
    if any(labeled) and not all(labeled):
        raise ShardWriteError(f"{list_file}: some lines have a class name after a TAB and some do not")
    classes = sorted(_class_names(items)) if items and all(labeled) else None
    return Source(root=root, items=items, classes=classes, skipped=skipped)


def sample_key(relative: str) -> str:
    """Stable key from the relative path: no extension, no '.' (webdataset splits key/extension there)."""
    stem = relative.rsplit(".", 1)[0] if "." in Path(relative).name else relative
    # No '', '.' or '..' segments: tar members named '../x.jpg' would escape wherever a tool extracts them.
    parts = [part for part in stem.split("/") if part not in ("", ".", "..")]
    return "/".join(parts).replace(".", "_")


def unsafe_member_name(name: str) -> str | None:
    """Why a tar member name must not be trusted as a sample key (absolute, or with a '..' segment:
    a tool that extracts by key would write outside its folder), or None. Our writer never makes one."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        return f"unsafe tar member name {name!r} (absolute path)"
    if ".." in re.split(r"[\\/]", name):
        return f"unsafe tar member name {name!r} ('..' segment)"
    return None


def manifest_shard_paths(directory: Path, names: list, manifest: Path) -> list[str]:
    """The shards a manifest lists, as paths inside its folder; ``UserError`` naming the manifest otherwise.

    A manifest is data that describes the files next to it: an absolute name or a '..' segment would point
    a reader anywhere on disk, and a URL scheme ('pipe:' runs a shell command; a folder of '.' turns
    ``./pipe:x`` into ``pipe:x``) is never a file name our writer makes.
    """
    paths = []
    for name in names:
        problem = _manifest_name_problem(name)
        if problem:
            raise UserError(
                f"{manifest}: shard name {name!r} refused ({problem}); "
                "a manifest lists the shard files in its own folder"
            )
        paths.append(path_in_folder(directory, name, manifest))
    return paths


def is_url(text: str) -> bool:
    """Whether a shard spec is opened as a URL or a command (webdataset's ``gopen``), not as a local file."""
    return "://" in text or text.startswith("pipe:")


def path_in_folder(directory: Path | str, name: str, where: object) -> str:
    """``directory / name`` as the path string a reader opens; ``UserError`` naming ``where`` when webdataset's
    ``gopen`` would not open that string as a file: it dispatches on a URL scheme, and Path drops a leading './',
    so a file named ``pipe:cmd`` in the folder '.' would run as a shell command (``gs:x.tar`` would run gsutil)."""
    from urllib.parse import urlparse

    path = str(Path(directory) / name)
    if urlparse(path).scheme:
        raise UserError(
            f"{where}: {name!r} refused: as a path it reads as the command or URL {path!r}; rename the file"
        )
    return path


def _manifest_name_problem(name) -> str | None:
    if not isinstance(name, str) or not name:
        return "not a file name"
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", name):
        return "a URL scheme, not a file"
    return unsafe_member_name(name)


def oversized_member(member: tarfile.TarInfo, field: str) -> str | None:
    """Why a tar member is too large to read (see :data:`MAX_MEMBER_BYTES`), or None."""
    limit = MAX_SIDECAR_BYTES if field.lower() in SIDECAR_KEYS else MAX_MEMBER_BYTES
    if member.size <= limit:
        return None
    return f"tar member {member.name!r} has {member.size} bytes, over the {limit}-byte limit for .{field} fields"


def parse_label(data: bytes) -> int:
    """A ``cls`` field's class index; ValueError when it is not an integer in ``0 .. MAX_CLASSES - 1``."""
    label = int(bytes(data).decode("ascii").strip())
    if not 0 <= label < MAX_CLASSES:
        raise ValueError(f"label {label} outside 0..{MAX_CLASSES - 1}")
    return label


def is_webdataset_meta(name: str) -> bool:
    """webdataset's per-shard metadata members (``__name__`` at the top level) are not samples."""
    return "/" not in name and name.startswith("__") and name.endswith("__")


def tar_members(url: str, mode: Literal["r|*", "r:"] = "r|*") -> Iterator[tuple[tarfile.TarInfo, Callable[[], bytes]]]:
    """The one tar reader: (member, read-its-bytes) for the regular files of a tar, in archive order,
    webdataset's metadata members left out. ``url`` is opened with webdataset's ``gopen`` (local paths,
    ``pipe:``, ``http(s)://``). ``mode="r|*"`` streams (any compression, no seeking: read a member's bytes
    before asking for the next member); ``mode="r:"`` needs a seekable uncompressed file, whose members'
    ``offset_data`` can be read again later (labeled sets index shards this way)."""
    from webdataset.gopen import gopen

    stream = gopen(url, "rb")
    try:
        with tarfile.open(fileobj=stream, mode=mode) as tar:
            for member in tar:
                if member.isreg() and not is_webdataset_meta(member.name):
                    yield member, functools.partial(_read_regular, tar, member)
    finally:
        stream.close()


def _read_regular(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    # extractfile gives None only for members that are not regular files (or links): tar_members yields none
    return cast(IO[bytes], tar.extractfile(member)).read()


# ---------------------------------------------------------------------------------------------
# Reading one image (runs in worker processes)
# ---------------------------------------------------------------------------------------------


@functools.cache
def image_formats() -> tuple[str, ...]:
    """PIL's decoders for :data:`IMAGE_EXTENSIONS`, and only those: bytes are never handed to the other
    decoders PIL would try (EPS/PostScript runs Ghostscript on them, and a rarely used decoder is attack
    surface), whatever the file claims to be."""
    from PIL import Image

    Image.init()
    return tuple(sorted({Image.registered_extensions()[extension] for extension in IMAGE_EXTENSIONS}))


def check_image_bytes(data: bytes, max_pixels: int | None = None):
    """Fully decode ``data`` with one of :func:`image_formats`; return the PIL image or raise ValueError with
    a short reason. Images declaring more than ``max_pixels`` (default :data:`MAX_IMAGE_PIXELS`) are refused unread."""
    from PIL import Image

    max_pixels = max_pixels or MAX_IMAGE_PIXELS
    if not data:
        raise ValueError("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=image_formats())
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(f"decompression bomb refused ({width}x{height} > {max_pixels} pixels)")
            image.load()
    except ValueError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"decompression bomb refused ({err})") from None
    except Exception as err:  # PIL raises many types for bad bytes (OSError, SyntaxError, struct.error...)
        raise ValueError(f"not a readable image ({type(err).__name__}: {err})") from None
    return image


def to_rgb(image):
    """An 8-bit RGB image as a viewer shows it: EXIF orientation applied (``ImageOps.exif_transpose``),
    16/32-bit grayscale scaled to 8 bits (not clipped), transparency (RGBA, LA, palette + alpha) composited
    over white rather than dropped to whatever colour the hidden pixels hold; CMYK, palette, grayscale
    converted. ValueError for a mode PIL cannot convert."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value * (1 / 256)).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def _reencode(image, max_side: int, quality: int) -> bytes:
    from PIL import Image

    image = to_rgb(image)
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def _load_item(args: tuple[str, int, int, int]) -> tuple[bytes | None, str, str | None, tuple[int, str] | None]:
    """(bytes or None, extension, skip reason or None, (channels, dtype) when the image is wider than the 8-bit RGB
    it will be decoded to); ``channels`` > 0: the pixels as a ``.npy`` array."""
    from ssl_hybrid.data.channels import wider_than_rgb

    path_text, max_side, quality, channels = args
    path = Path(path_text)
    if channels:
        return (*_load_array(path, channels), None)
    extension = path.suffix.lower().lstrip(".")
    extension = "jpg" if extension == "jpeg" else "tif" if extension == "tiff" else extension
    try:
        data = path.read_bytes()
    except OSError as err:
        return None, extension, f"cannot read ({err.strerror or err})", None
    try:
        image = check_image_bytes(data)
        if max_side > 0:
            return _reencode(image, max_side, quality), "jpg", None, wider_than_rgb(data)
    except ValueError as err:
        wide = wider_than_rgb(data)  # e.g. a 5-channel TIFF: Pillow has no mode for it
        hint = f" ({wide[0]} x {wide[1]}: ssl-hybrid shards --channels {wide[0]} reads it)" if wide else ""
        return None, extension, f"{err}{hint}", None
    except Exception as err:  # EXIF, mode conversion and encoder failures on exotic files
        return None, extension, f"cannot re-encode ({type(err).__name__}: {err})", None
    return data, extension, None, wider_than_rgb(data)


def _load_array(path: Path, channels: int) -> tuple[bytes | None, str, str | None]:
    from ssl_hybrid.data.channels import NPY_KEY, encode_npy, read_array

    try:
        array = read_array(path.read_bytes(), path.name)
    except OSError as err:
        return None, NPY_KEY, f"cannot read ({err.strerror or err})"
    except ValueError as err:
        return None, NPY_KEY, str(err)
    if array.shape[0] != channels:
        return None, NPY_KEY, f"{array.shape[0]} channels (shape {tuple(array.shape)}), --channels {channels}"
    return encode_npy(array), NPY_KEY, None


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_replaceable(out: Path) -> None:
    """Refuse an output folder that holds anything but a shard set (it is replaced as a whole)."""
    if out.is_symlink() or not out.is_dir():
        raise ShardWriteError(f"{out}: exists and is not a directory (or is a symbolic link); choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if not (p.is_file() and _OUTPUT_FILE.fullmatch(p.name)))
    if foreign:
        raise ShardWriteError(
            f"{out}: holds {foreign[0]!r}, which is not part of a shard set; --out is replaced as "
            "a whole, so choose an empty or new folder"
        )


def _publish(tmp: Path, out: Path, replace: bool) -> None:
    """Swap the complete set in (on disk first: fsynced); without ``replace`` an output another process
    completed first is kept."""
    from ssl_hybrid.runs import fsync_folder, replace_dir

    fsync_folder(tmp)
    if replace:
        replace_dir(tmp, out)
        return
    try:
        os.rename(tmp, out)
    except OSError:
        if not (out / MANIFEST).exists():
            raise
        log.info("another process wrote %s first; using its copy", out)


def _write_json(path: Path, payload) -> None:
    from ssl_hybrid.runs import write_json_atomic

    write_json_atomic(path, payload)


def _load_all(items: list[SourceItem], max_side: int, quality: int, workers: int, channels: int = 0) -> Iterator[tuple]:
    jobs = [(str(item.path), max_side, quality, channels) for item in items]
    if workers <= 1:
        yield from map(_load_item, jobs)
        return
    with get_context("spawn" if os.name == "nt" else "fork").Pool(workers) as pool:
        yield from pool.imap(_load_item, jobs, chunksize=4)


def write_shards(
    src: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    max_side: int = 0,
    quality: int = 90,
    seed: int = 0,
    shuffle: bool = True,
    workers: int = 1,
    prefix: str | None = None,
    labels: str = "auto",
    label_regex: str | None = None,
    progress: bool = True,
    replace: bool = True,
    channels: int = 0,
    channel_names: list[str] | None = None,
) -> dict:
    """Write shards + manifest.json (+ classes.json) as the folder ``out``; return the manifest.

    Written into ``.<out>.partial-*`` next to ``out`` and swapped in when complete; ``replace=False`` keeps an
    ``out`` that another process completed first (the image-folder cache). ``channels`` > 0 stores every image as
    a ``[channels, H, W]`` array in its own bit depth and records per-channel statistics (``data.channels``)."""
    src, out = Path(src), Path(out)
    if shard_size < 1:
        raise ShardWriteError(f"--shard-size must be >= 1, got {shard_size}")
    if max_side < 0 or not 1 <= quality <= 100:
        raise ShardWriteError(f"--max-side must be >= 0 and --quality in [1, 100] (got {max_side}, {quality})")
    _check_channel_args(channels, channel_names or [], max_side)
    if not src.exists():
        raise ShardWriteError(f"{src}: source not found (expected an image folder or a text list of images)")
    source = collect_folder(src, labels, label_regex) if src.is_dir() else collect_list(src)
    if not source.items:
        raise ShardWriteError(f"{src}: no image files found ({len(source.skipped)} files skipped)")
    if shuffle:
        random.Random(seed).shuffle(source.items)
    prefix = prefix or out.resolve().name
    if replace and (out.exists() or out.is_symlink()):
        _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (
        out.parent.glob(f".{glob.escape(out.name)}{_TMP_PREFIX}*") if replace else []
    ):  # a killed run's temp folder
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}{_TMP_PREFIX}{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        write = functools.partial(_write_set, channels=channels, channel_names=channel_names or [])
        manifest = write(
            source, src, tmp, out, prefix, shard_size, max_side, quality, workers, progress, seed if shuffle else None
        )
        _publish(tmp, out, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "wrote %d samples in %d shards to %s (%d skipped)",
        manifest["num_samples"],
        len(manifest["shards"]),
        out,
        len(manifest["skipped"]),
    )
    return manifest


def _write_set(
    source: Source,
    src: Path,
    tmp: Path,
    out: Path,
    prefix: str,
    shard_size: int,
    max_side: int,
    quality: int,
    workers: int,
    progress: bool,
    seed: int | None,
    channels: int = 0,
    channel_names: list[str] | None = None,
) -> dict:
    """The shards, classes.json and manifest.json of ``source``, written into ``tmp``."""
    import webdataset as wds
    from tqdm import tqdm

    from ssl_hybrid.data.channels import StatsAccumulator, decode_npy, ome_channel_names

    class_index = {name: index for index, name in enumerate(source.classes or [])}
    stats = StatsAccumulator(seed=seed or 0)

    shards: list[dict] = []
    skipped = list(source.skipped)
    keys: set[str] = set()
    flattened: list[tuple[str, int, str]] = []  # images wider than the 8-bit RGB the stream decodes them to

    def finished(partial_name: str) -> None:
        partial = Path(partial_name)
        final = partial.with_name(partial.name[len(_TMP_PREFIX) :])
        count = writer.count
        if count == 0:  # ShardWriter opens a next shard eagerly; an empty one is not a shard
            partial.unlink()
            return
        os.replace(partial, final)
        shards.append({"name": final.name, "samples": count, "sha256": _sha256(final)})

    writer = wds.ShardWriter(
        str(tmp / f"{_TMP_PREFIX}{prefix}-%06d.tar"),
        maxcount=shard_size,
        post=finished,
        verbose=0,
        encoder=False,
        mtime=0,
    )
    try:
        loaded = _load_all(source.items, max_side, quality, workers, channels)
        for item, (data, extension, reason, wide) in tqdm(
            zip(source.items, loaded),
            total=len(source.items),
            desc=f"shards {out.name}",
            unit="img",
            disable=not progress,
        ):
            if reason is not None:
                log.warning("skipping %s: %s", item.relative, reason)
                skipped.append({"path": item.relative, "reason": reason})
                continue
            key = sample_key(item.relative)
            if key in keys:
                skipped.append({"path": item.relative, "reason": f"duplicate key {key!r}"})
                continue
            keys.add(key)
            if wide is not None:
                flattened.append((item.relative, *wide))
            if channels and stats.images < stats.max_images:  # the first images of the shuffled order
                stats.add(decode_npy(data, MAX_IMAGE_PIXELS))
            sample = {"__key__": key, extension: data}
            if item.class_name is not None:
                sample["cls"] = str(class_index[item.class_name]).encode("ascii")
                sample["json"] = json.dumps({"class_name": item.class_name, "source": item.relative}).encode()
            writer.write(sample)
        writer.close()
        if not shards:
            raise ShardWriteError(
                f"{src}: none of the {len(source.items)} images could be read, e.g. "
                f"{skipped[-1]['path']}: {skipped[-1]['reason']}"
            )
    except BaseException:
        if getattr(writer, "tarstream", None) is not None:
            writer.tarstream.close()
        raise
    _warn_flattened(flattened)
    manifest = {
        "format": FORMAT,
        "source": str(src),
        "num_samples": sum(s["samples"] for s in shards),
        "shards": shards,
        "classes": source.classes,
        "skipped": sorted(skipped, key=lambda s: s["path"]),
        "shard_size": shard_size,
        "max_side": max_side,
        "seed": seed,
    }
    if channels:
        names = list(channel_names or []) or ome_channel_names(source.items[0].path, channels)
        manifest.update(channels=channels, channel_names=names, channel_stats=stats.result())
    if source.classes is not None:
        _write_json(tmp / CLASSES, source.classes)
    _write_json(tmp / MANIFEST, manifest)
    return manifest


def _warn_flattened(flattened: list[tuple[str, int, str]]) -> None:
    """One line for the images an RGB shard set squeezes into 8-bit RGB: written as they are, they are read as RGB
    by everything downstream (dim 16-bit signal and channels past the third lost). A warning, not a refusal: RGB
    models of 16-bit or RGBA-like data are a legitimate choice, and it is the documented RGB path."""
    if not flattened:
        return
    path, channels, dtype = min(flattened)
    usual = collections.Counter(count for _, count, _ in flattened).most_common(1)[0][0]
    log.warning(
        "%d image%s 16-bit, float or more than 3 channels (e.g. %s: %d x %s) and will be converted to 8-bit "
        "RGB when read; ssl-hybrid shards --channels %d keeps every channel and bit (docs/multichannel.md)",
        len(flattened),
        " is" if len(flattened) == 1 else "s are",
        path,
        channels,
        dtype,
        usual,
    )


def _check_channel_args(channels: int, channel_names: list[str], max_side: int) -> None:
    from ssl_hybrid.data.channels import check_channel_config

    if not channels:
        if channel_names:
            raise ShardWriteError("--channel-names needs --channels")
        return
    check_channel_config(channels, channel_names, "--channels", "--channel-names")
    if max_side:
        raise ShardWriteError("--max-side re-encodes as 8-bit JPEG; with --channels images are stored as they are")


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{directory}: no {MANIFEST} (not a shard directory, or an interrupted 'ssl-hybrid shards' run; re-run it)"
        ) from None
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: JSON nested deeper than any manifest
        raise UserError(f"{path}: unreadable manifest ({type(err).__name__}: {err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not an {FORMAT} manifest")
    return manifest


# ---------------------------------------------------------------------------------------------
# Image folders used directly as data.train: sharded once into a fingerprinted cache
# ---------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where derived data lives (``SSL_HYBRID_CACHE``, default ``~/.cache/ssl_hybrid``)."""
    return Path(os.environ.get("SSL_HYBRID_CACHE", Path.home() / ".cache" / "ssl_hybrid"))


def folder_fingerprint(root: Path) -> str:
    """A hash of the folder's path and every file's (relative path, size, mtime): changes when images do."""
    digest = hashlib.sha256(str(root.resolve()).encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def shards_for_image_folder(root: str | Path, max_side: int = 0, shard_size: int = 1000, channels: int = 0) -> Path:
    """Shard an image folder once (labels from class sub-folders when present) and return the shard dir;
    ``channels`` > 0 stores ``[channels, H, W]`` arrays, as ``ssl-hybrid shards --channels`` (its own cache entry).

    The output is keyed by :func:`folder_fingerprint`, so re-runs reuse it and edits to the folder make a
    new one. :func:`write_shards` writes a private temp dir and renames it into place, so an interrupted run never
    exposes a half-written set. Under torchrun / accelerate launch one process per node writes it while the node's
    other ranks wait, then find it; nodes that share the cache folder may race, and the loser of the rename just
    uses the winner's copy.
    """
    root = Path(root)
    suffix = f"-c{channels}" if channels else ""
    target = cache_root() / "shards" / f"{root.resolve().name}-{folder_fingerprint(root)}{suffix}"
    from ssl_hybrid.distributed import main_process_first

    with main_process_first(local=True):
        if not (target / MANIFEST).exists():
            log.info("sharding image folder %s once into %s", root, target)
            write_shards(
                root,
                target,
                shard_size=shard_size,
                max_side=max_side,
                prefix=root.resolve().name,
                workers=1,
                progress=True,
                replace=False,
                channels=channels,
            )
    return target


def manifest_fingerprint(urls: list[str]) -> str | None:
    """A hash of what the manifests say about the shards in ``urls`` (name, samples, sha256 of each): it changes
    when the data under the same path does. None when no shard has a manifest (brace patterns of bare tars,
    ``pipe:`` and http URLs): such data cannot be checked."""
    wanted: dict[Path, set[str]] = {}
    for url in urls:
        if not is_url(url):
            wanted.setdefault(Path(url).parent, set()).add(Path(url).name)
    entries = []
    for directory in sorted(wanted):
        if (directory / MANIFEST).exists():
            entries += [
                [s["name"], s["samples"], s["sha256"]]
                for s in read_manifest(directory)["shards"]
                if s["name"] in wanted[directory]
            ]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16] if entries else None
