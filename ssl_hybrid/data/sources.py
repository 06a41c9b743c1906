"""Where samples come from, for training, evaluation and the feature cache alike: one shard resolver
(:func:`resolve_shard_set`) and one skip-rate rule (:func:`skip_rate_exceeded`).

Nothing here imports torch or webdataset: labeled sets resolve their shards without loading either.

Security rules (a spec may come from a recipe, a list file or a manifest written elsewhere): ``pipe:``
runs a shell command only where the spec itself names it; a list file holds one only with
``data.allow_pipe_in_lists``; a manifest lists only files in its own folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ssl_hybrid.data import shards as shard_format
from ssl_hybrid.data.shards import is_url
from ssl_hybrid.errors import UserError

LIST_SUFFIXES = (".txt", ".list", ".lst")


@dataclass(frozen=True)
class ShardSet:
    """Resolved shards: their URLs and, when a manifest describes them, samples per shard and class names."""

    urls: list[str]
    counts: dict[str, int] | None = None
    classes: list[str] | None = None


def _expand(pattern: str) -> list[str]:
    import braceexpand

    urls: list[str] = []
    for part in pattern.split("::"):  # webdataset's separator for several patterns
        urls.extend(braceexpand.braceexpand(part.strip()))
    return urls


def _looks_like_image_folder(directory: Path, look_at: int = 2000) -> bool:
    for index, path in enumerate(directory.rglob("*")):
        if index >= look_at:
            return False
        if path.suffix.lower() in shard_format.IMAGE_EXTENSIONS:
            return True
    return False


def _list_entries(path: Path, allow_pipe: bool) -> list[str]:
    """A shard list file's shards: one per line, relative to the file, '#' comments. A ``pipe:`` line runs a
    shell command, so a list (a file that may come from elsewhere) holds one only with data.allow_pipe_in_lists."""
    urls = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("pipe:") and not allow_pipe:
            raise UserError(
                f"{path} line {number}: a 'pipe:' shard runs a shell command; a shard list may hold one "
                "only with data.allow_pipe_in_lists=true (type pipe: specs in data.train to run them)"
            )
        where = f"{path} line {number}"
        urls.append(
            line if is_url(line) or Path(line).is_absolute() else shard_format.path_in_folder(path.parent, line, where)
        )
    return urls


def _from_manifest(directory: Path) -> ShardSet:
    """The shards a manifest lists (every one must exist, inside its folder), their sample counts and classes."""
    where = directory / shard_format.MANIFEST
    manifest = shard_format.read_manifest(directory)
    items = manifest.get("shards")
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise UserError(f"{where}: 'shards' must be a list of {{name, samples}} objects")
    urls = shard_format.manifest_shard_paths(directory, [item.get("name") for item in items], where)
    if not urls:
        raise UserError(f"{where}: lists no shards")
    try:
        counts = {url: int(item["samples"]) for url, item in zip(urls, items)}
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where}: every shard needs an integer 'samples' count") from None
    missing = [url for url in urls if not Path(url).exists()]
    if missing:
        raise UserError(
            f"{where}: {len(missing)} of {len(urls)} listed shards are missing, e.g. {Path(missing[0]).name}"
        )
    classes = manifest.get("classes")
    return ShardSet(urls, counts, [str(c) for c in classes] if isinstance(classes, list) else None)


def _from_directory(directory: Path, channels: int = 0) -> ShardSet:
    if (directory / shard_format.MANIFEST).exists():
        return _from_manifest(directory)
    tars = sorted(shard_format.path_in_folder(directory, p.name, directory) for p in directory.glob("*.tar"))
    if tars:  # shards written by another tool: no counts, so a cut shard counts as one lost sample
        return ShardSet(tars)
    if _looks_like_image_folder(directory):
        # An image folder: shard it once into the cache (for large corpora, run `ssl-hybrid shards`
        # yourself to choose shard size, re-encoding and where the shards live), as N-channel arrays when the
        # run takes them: converted to RGB first, the data would be written and only then refused.
        return _from_manifest(shard_format.shards_for_image_folder(directory, channels=channels))
    return _from_manifest(directory)  # raises: no manifest


def resolve_shard_set(spec: str | Path, allow_pipe_in_lists: bool = False, channels: int = 0) -> ShardSet:
    """Shards from a brace pattern (``a-{000000..000009}.tar``, several joined by ``::``), a list file
    (``.txt``: one shard per line, relative to the file), a directory with ``manifest.json`` (or that
    manifest's path), a directory of ``.tar`` files, an image folder (sharded once into the cache; with
    ``channels`` > 0 as ``shards --channels`` does, see :func:`folder_channels`), or URLs (``pipe:``,
    ``http(s)://``...). Raises UserError naming what is wrong."""
    from ssl_hybrid.config import DEFAULT_CORPUS, REPO_ROOT

    spec = str(spec).strip()
    if not spec:
        raise UserError("empty shard spec: name shards, a shard directory or a list file")
    if is_url(spec):
        return ShardSet(_expand(spec))
    path = Path(spec)
    if spec.rstrip("/") == DEFAULT_CORPUS and not path.exists():  # the embedded corpus, from any directory
        path = REPO_ROOT / DEFAULT_CORPUS
    if path.is_dir():
        return _from_directory(path, channels)
    if path.name == shard_format.MANIFEST:
        return _from_manifest(path.parent)
    if path.suffix.lower() in LIST_SUFFIXES and path.is_file():
        urls = _list_entries(path, allow_pipe_in_lists)
    else:
        urls = _expand(spec)
    missing = [url for url in urls if not is_url(url) and not Path(url).exists()]
    if missing:
        raise UserError(f"{spec}: {len(missing)} of {len(urls)} shards not found, e.g. {missing[0]}")
    if not urls:
        raise UserError(f"{spec}: names no shards")
    return ShardSet(urls)


def resolve_shards(spec: str | Path, allow_pipe_in_lists: bool = False, channels: int = 0) -> list[str]:
    """The shard URLs of :func:`resolve_shard_set`."""
    return resolve_shard_set(spec, allow_pipe_in_lists, channels).urls


def folder_channels(data_cfg) -> int:
    """How the trainer shards an image folder given as ``data.train``: ``data.channels`` arrays per image when it
    is not 3 (the RGB default: ordinary images, decoded as before), else 0 (the RGB shard set)."""
    return data_cfg.channels if data_cfg.channels != 3 else 0


def skip_rate_exceeded(seen: int, skipped: int, max_rate: float, min_samples: int = 1, final: bool = True) -> bool:
    """The one skip rule (``data.max_skip_rate``): more than ``max_rate`` of the samples seen were skipped.
    Judged once ``min_samples`` were seen, or on everything there is when ``final`` (an epoch's or a set's end),
    so a few bad samples at the start of a stream do not stop it."""
    if seen == 0 or (seen < min_samples and not final):
        return False
    return skipped / seen > max_rate
