"""Write webdataset tar shards from an image folder or a text list of images.

Shard format (``ssl_hybrid-shards/1``; other stages read it, so it does not change):

- ``<prefix>-000000.tar``, ``<prefix>-000001.tar``... written with :class:`webdataset.ShardWriter`;
- each sample: ``__key__`` (the source path relative to the source root, without its extension, ``.``
  replaced by ``_``: stable and unique), the image under its original extension (``jpg``/``png``/...;
  re-encoded ``jpg`` when ``max_side`` is set) and, for labeled sources, ``cls`` (index into the sorted
  class names) and ``json`` (``{"class_name": ..., "source": <relative path>}``);
- ``manifest.json``: format, source, num_samples, shards (name, samples, sha256), classes (or null),
  skipped (path + reason) and shard_size; labeled output also gets ``classes.json``.

Interrupting a run never leaves a shard that counts as complete: a shard is written under a temporary
name and renamed when closed, and ``manifest.json`` (which is what readers trust) is written last,
atomically. A re-run first removes the previous run's shards, temporary files and manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import tarfile
import tempfile
import warnings
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator, Optional

from ssl_hybrid.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "ssl_hybrid-shards/1"
MANIFEST = "manifest.json"
CLASSES = "classes.json"
# The one image-extension list: image files in folders and lists, and (without the dot, in this order of
# preference) the image field of a shard sample, for the stream and the labeled sets alike.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
IMAGE_KEYS = tuple(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
# PIL's own default (about 89 Mpx); an image declaring more pixels is refused before decoding.
MAX_IMAGE_PIXELS = 89_478_485
_TMP_PREFIX = ".partial-"


class ShardWriteError(UserError):
    """The source cannot be turned into shards (missing, empty, unreadable list)."""


@dataclass
class SourceItem:
    path: Path  # absolute path of the image file
    relative: str  # path relative to the source root (or as written in the list file)
    class_name: Optional[str] = None


@dataclass
class Source:
    root: Path
    items: list[SourceItem]
    classes: Optional[list[str]]
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
                skipped.append({"path": path.relative_to(root).as_posix(), "reason": "symlink leaves the source folder"})
                continue
            found.append(path)
    return found


def _label_from_regex(regex: re.Pattern, name: str) -> Optional[str]:
    match = regex.search(name)
    if not match:
        return None
    return match.group(1) if match.groups() else match.group(0)


def collect_folder(root: Path, labels: str = "auto", label_regex: Optional[str] = None) -> Source:
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
                skipped.append({"path": item.relative, "reason": f"file name does not match --label-regex {label_regex!r}"})
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
    classes = sorted({item.class_name for item in items}) if items and items[0].class_name is not None else None
    return Source(root=root, items=items, classes=classes, skipped=skipped)


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
    classes = sorted({item.class_name for item in items}) if items and all(labeled) else None
    return Source(root=root, items=items, classes=classes, skipped=skipped)


def sample_key(relative: str) -> str:
    """Stable key from the relative path: no extension, no '.' (webdataset splits key/extension there)."""
    stem = relative.rsplit(".", 1)[0] if "." in Path(relative).name else relative
    # No '', '.' or '..' segments: tar members named '../x.jpg' would escape wherever a tool extracts them.
    parts = [part for part in stem.split("/") if part not in ("", ".", "..")]
    return "/".join(parts).replace(".", "_")


def unsafe_member_name(name: str) -> Optional[str]:
    """Why a tar member name must not be trusted as a sample key (absolute, or with a '..' segment:
    a tool that extracts by key would write outside its folder), or None. Our writer never makes one."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        return f"unsafe tar member name {name!r} (absolute path)"
    if ".." in re.split(r"[\\/]", name):
        return f"unsafe tar member name {name!r} ('..' segment)"
    return None


def is_webdataset_meta(name: str) -> bool:
    """webdataset's per-shard metadata members (``__name__`` at the top level) are not samples."""
    return "/" not in name and name.startswith("__") and name.endswith("__")


def tar_members(url: str, mode: str = "r|*") -> Iterator[tuple[tarfile.TarInfo, Callable[[], bytes]]]:
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
                    yield member, lambda member=member: tar.extractfile(member).read()
    finally:
        stream.close()


# ---------------------------------------------------------------------------------------------
# Reading one image (runs in worker processes)
# ---------------------------------------------------------------------------------------------


def check_image_bytes(data: bytes, max_pixels: Optional[int] = None):
    """Fully decode ``data``; return the PIL image or raise ValueError with a short reason.
    Images declaring more than ``max_pixels`` (default :data:`MAX_IMAGE_PIXELS`) are refused unread."""
    from PIL import Image

    max_pixels = max_pixels or MAX_IMAGE_PIXELS
    if not data:
        raise ValueError("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
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


def _load_item(args: tuple[str, int, int]) -> tuple[Optional[bytes], str, Optional[str]]:
    """(bytes or None, extension, skip reason or None)."""
    path_text, max_side, quality = args
    path = Path(path_text)
    extension = path.suffix.lower().lstrip(".")
    extension = "jpg" if extension == "jpeg" else "tif" if extension == "tiff" else extension
    try:
        data = path.read_bytes()
    except OSError as err:
        return None, extension, f"cannot read ({err.strerror or err})"
    try:
        image = check_image_bytes(data)
        if max_side > 0:
            return _reencode(image, max_side, quality), "jpg", None
    except ValueError as err:
        return None, extension, str(err)
    except Exception as err:  # EXIF, mode conversion and encoder failures on exotic files
        return None, extension, f"cannot re-encode ({type(err).__name__}: {err})"
    return data, extension, None


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _clean_previous(out: Path, prefix: str) -> None:
    """Remove a previous (possibly interrupted) run's shards, temp files and manifest."""
    pattern = re.compile(rf"^(?:{re.escape(_TMP_PREFIX)})?{re.escape(prefix)}-\d{{6}}\.tar$")
    for path in out.iterdir():
        if pattern.match(path.name) or path.name in (MANIFEST, CLASSES):
            path.unlink()


def _write_json(path: Path, payload) -> None:
    from ssl_hybrid.runs import write_json_atomic

    write_json_atomic(path, payload)
    os.chmod(path, 0o644)  # mkstemp makes 0600; shards are read by other users and jobs


def _load_all(items: list[SourceItem], max_side: int, quality: int, workers: int) -> Iterator[tuple]:
    jobs = [(str(item.path), max_side, quality) for item in items]
    if workers <= 1:
        yield from map(_load_item, jobs)
        return
    with get_context("spawn" if os.name == "nt" else "fork").Pool(workers) as pool:
        yield from pool.imap(_load_item, jobs, chunksize=4)


def write_shards(src: str | Path, out: str | Path, shard_size: int = 1000, max_side: int = 0, quality: int = 90,
                 seed: int = 0, shuffle: bool = True, workers: int = 1, prefix: Optional[str] = None,
                 labels: str = "auto", label_regex: Optional[str] = None, progress: bool = True) -> dict:
    """Write shards + manifest.json (+ classes.json) into ``out``; return the manifest."""
    import webdataset as wds
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    if shard_size < 1:
        raise ShardWriteError(f"--shard-size must be >= 1, got {shard_size}")
    if max_side < 0 or not 1 <= quality <= 100:
        raise ShardWriteError(f"--max-side must be >= 0 and --quality in [1, 100] (got {max_side}, {quality})")
    if not src.exists():
        raise ShardWriteError(f"{src}: source not found (expected an image folder or a text list of images)")
    source = collect_folder(src, labels, label_regex) if src.is_dir() else collect_list(src)
    if not source.items:
        raise ShardWriteError(f"{src}: no image files found ({len(source.skipped)} files skipped)")
    if shuffle:
        random.Random(seed).shuffle(source.items)
    prefix = prefix or out.resolve().name
    if out.exists() and not out.is_dir():
        raise ShardWriteError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    _clean_previous(out, prefix)
    class_index = {name: index for index, name in enumerate(source.classes or [])}

    shards: list[dict] = []
    skipped = list(source.skipped)
    keys: set[str] = set()

    def finished(tmp_name: str) -> None:
        tmp = Path(tmp_name)
        final = tmp.with_name(tmp.name[len(_TMP_PREFIX):])
        count = writer.count
        if count == 0:  # ShardWriter opens a next shard eagerly; an empty one is not a shard
            tmp.unlink()
            return
        os.replace(tmp, final)
        shards.append({"name": final.name, "samples": count, "sha256": _sha256(final)})

    writer = wds.ShardWriter(str(out / f"{_TMP_PREFIX}{prefix}-%06d.tar"), maxcount=shard_size, post=finished,
                             verbose=0, encoder=False, mtime=0)
    try:
        loaded = _load_all(source.items, max_side, quality, workers)
        for item, (data, extension, reason) in tqdm(zip(source.items, loaded), total=len(source.items),
                                                    desc=f"shards {out.name}", unit="img", disable=not progress):
            if reason is not None:
                log.warning("skipping %s: %s", item.relative, reason)
                skipped.append({"path": item.relative, "reason": reason})
                continue
            key = sample_key(item.relative)
            if key in keys:
                skipped.append({"path": item.relative, "reason": f"duplicate key {key!r}"})
                continue
            keys.add(key)
            sample = {"__key__": key, extension: data}
            if item.class_name is not None:
                sample["cls"] = str(class_index[item.class_name]).encode("ascii")
                sample["json"] = json.dumps({"class_name": item.class_name, "source": item.relative}).encode()
            writer.write(sample)
        writer.close()
        if not shards:
            raise ShardWriteError(f"{src}: none of the {len(source.items)} images could be read, e.g. "
                                  f"{skipped[-1]['path']}: {skipped[-1]['reason']}")
    except BaseException:
        if getattr(writer, "tarstream", None) is not None:
            writer.tarstream.close()
        for leftover in out.glob(f"{_TMP_PREFIX}{prefix}-*.tar"):
            leftover.unlink()
        raise
    manifest = {"format": FORMAT, "source": str(src), "num_samples": sum(s["samples"] for s in shards),
                "shards": shards, "classes": source.classes, "skipped": sorted(skipped, key=lambda s: s["path"]),
                "shard_size": shard_size, "max_side": max_side, "seed": seed if shuffle else None}
    if source.classes is not None:
        _write_json(out / CLASSES, source.classes)
    _write_json(out / MANIFEST, manifest)  # last: its presence marks the output as complete
    log.info("wrote %d samples in %d shards to %s (%d skipped)", manifest["num_samples"], len(shards), out,
             len(skipped))
    return manifest


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{directory}: no {MANIFEST} (not a shard directory, or an interrupted "
                        f"'ssl-hybrid shards' run; re-run it)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable manifest ({err})") from None
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


def shards_for_image_folder(root: str | Path, max_side: int = 0, shard_size: int = 1000) -> Path:
    """Shard an image folder once (labels from class sub-folders when present) and return the shard dir.

    The output is keyed by :func:`folder_fingerprint`, so re-runs reuse it and edits to the folder make a
    new one. Written to a private temp dir and renamed into place, so an interrupted run never exposes a
    half-written set. Under torchrun / accelerate launch one process per node writes it while the node's
    other ranks wait, then find it; nodes that share the cache folder may race, and the loser of the rename
    just uses the winner's copy.
    """
    root = Path(root)
    target = cache_root() / "shards" / f"{root.resolve().name}-{folder_fingerprint(root)}"
    with local_main_process_first():
        if not (target / MANIFEST).exists():
            _shard_into(root, target, max_side, shard_size)
    return target


@contextlib.contextmanager
def local_main_process_first() -> Iterator[None]:
    """Accelerate's ``local_main_process_first`` (the node's local rank 0 runs the block, then the node's other
    ranks), except that a failing local main still releases the others: they then run the block themselves
    and meet the same error, each with its one line, instead of waiting for a barrier that never comes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if not state.is_local_main_process:
        state.wait_for_everyone()
        yield
        return
    try:
        yield
    finally:
        state.wait_for_everyone()


def _shard_into(root: Path, target: Path, max_side: int, shard_size: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    log.info("sharding image folder %s once into %s", root, target)
    try:
        write_shards(root, tmp, shard_size=shard_size, max_side=max_side, prefix=target.name.rsplit("-", 1)[0],
                     workers=1, progress=True)
        os.rename(tmp, target)
    except OSError:
        if not (target / MANIFEST).exists():
            raise
        log.info("another process sharded %s first; using its copy", root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
