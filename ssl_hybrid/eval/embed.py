"""Embeddings out: ``embed`` writes a folder other tools read, ``neighbors`` searches it, ``plot_map`` draws it.

An embeddings folder holds

- ``embeddings.npy``: float32, L2-normalised, N x D (``np.load(path, mmap_mode="r")`` maps it);
- ``ids.csv``: one row per embedding, same order: ``id`` (path relative to the data root, or shard key),
  ``label`` (-1 when unknown), ``class``, and where the image lives (``path``, with ``offset``/``size``
  inside a tar shard, -1 for a plain file);
- ``index.faiss``: a ``faiss.IndexFlatIP`` over the embeddings (``faiss.read_index``), the evaluators' search;
- ``meta.json``: the backbone (spec and content hash), pooling, image size, preprocessing, the data and the
  images skipped as unreadable. It is written last: a folder without it is not complete.

Features are the evaluators' own: the same loader, eval transform, pooling and ``extract_features``
(ssl_hybrid.eval.features) in batches of the same size, normalised as ``knn`` normalises its bank, so
``neighbors`` finds what the k-NN evaluator finds. Images are embedded in chunks (a multiple of the batch
size); each finished chunk is saved under ``.parts/``, so an interrupted run resumes at the first missing
chunk, and the final files are assembled chunk by chunk (memory stays at one chunk whatever N is).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_hybrid.config import EvalConfig
from ssl_hybrid.data.labeled import UNLABELED, LabeledSet, Sample, check_images, load_images
from ssl_hybrid.errors import UserError
from ssl_hybrid.runs import atomic_path

log = logging.getLogger(__name__)

FORMAT = "ssl_hybrid-embeddings/1"
EMBEDDINGS, IDS, INDEX, META, PARTS, LOCK = "embeddings.npy", "ids.csv", "index.faiss", "meta.json", ".parts", ".lock"
ID_COLUMNS = ("id", "label", "class", "path", "offset", "size")
DEFAULT_CHUNK_BATCHES = 32  # a chunk = 32 batches: ~4k images at the default batch size, a few minutes on a CPU


class EmbeddingsError(UserError):
    """An embeddings folder that cannot be written or read: another backbone's, incomplete, unknown query."""


# ---------------------------------------------------------------------------------------------
# The embedder: one backbone with the evaluators' preprocessing and pooling
# ---------------------------------------------------------------------------------------------


@dataclass
class Embedder:
    model: torch.nn.Module
    backbone: dict[str, Any]  # load_backbone_spec's meta
    pooling: str  # the pooling actually used (resolved_pooling)
    forward: Callable
    batch_size: int = EvalConfig.batch_size
    num_workers: int = 0
    progress: bool = False

    @property
    def image_size(self) -> int:
        return int(self.backbone["image_size"])

    @property
    def channels(self) -> int | None:
        """The channel count of the arrays this backbone takes (None: RGB images): what images are checked with."""
        from ssl_hybrid.eval.features import input_channels

        return input_channels(self.backbone)

    def features(self, labeled: LabeledSet) -> np.ndarray:
        """L2-normalised float32 [len(labeled), D]: the evaluators' extraction of these images."""
        from ssl_hybrid.eval.features import extract_features, make_loader, transform_for
        from ssl_hybrid.eval.knn import l2_normalize

        loader = make_loader(labeled, transform_for(self.backbone, self.image_size), self.batch_size, self.num_workers)
        features, _ = extract_features(self.model, loader, progress=self.progress, forward=self.forward)
        return l2_normalize(features)

    def describe(self) -> dict[str, Any]:
        """meta.json's backbone and preprocessing, enough to embed new images the same way elsewhere."""
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        from ssl_hybrid.models.contract import EVAL_CROP_PCT

        keys = ("spec", "model", "kind", "hash", "image_size", "num_features", "weights")
        described: dict[str, Any] = {
            "backbone": {k: self.backbone.get(k) for k in keys},
            "pooling": self.pooling,
            "image_size": self.image_size,
            "preprocessing": {
                "resize_shorter_side": int(round(self.image_size / EVAL_CROP_PCT)),
                "interpolation": "bicubic",
                "center_crop": self.image_size,
                "crop_pct": EVAL_CROP_PCT,
                "mean": list(IMAGENET_DEFAULT_MEAN),
                "std": list(IMAGENET_DEFAULT_STD),
            },
            "normalised": "l2",
        }
        if self.backbone.get("normalization"):  # N-channel arrays: bilinear, the pretraining data's statistics
            normalization = self.backbone["normalization"]
            described["preprocessing"].update(
                interpolation="bilinear", mean=normalization["mean"], std=normalization["std"]
            )
            described["preprocessing"]["channel_names"] = normalization.get("names", [])
        return described


def load_embedder(
    spec: str,
    image_size: int | None = None,
    pooling: str = EvalConfig.pooling,
    batch_size: int = EvalConfig.batch_size,
    num_workers: int = 0,
    progress: bool = False,
) -> Embedder:
    from ssl_hybrid.eval.backbones import load_backbone_spec
    from ssl_hybrid.eval.features import eval_device, pooling_forward, resolved_pooling

    if image_size is not None and image_size < 0:
        raise EmbeddingsError(f"--image-size must be >= 0 (0 = the backbone's pretraining size), got {image_size}")
    if spec.startswith(("timm:", "random:")) or "://" in spec:
        resolved = spec
    else:  # a path: absolute, so `neighbors` finds the backbone again from any directory
        resolved = str(Path(spec).resolve())
    model, meta = load_backbone_spec(resolved, image_size=image_size or None)
    model = model.to(eval_device())
    return Embedder(
        model,
        meta,
        resolved_pooling(model, pooling),
        pooling_forward(model, pooling),
        batch_size,
        num_workers,
        progress,
    )


# ---------------------------------------------------------------------------------------------
# embed: DATA -> folder
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise EmbeddingsError(f"{path}: not valid JSON ({err}); move the folder away or use another --out") from None


def _identity(embedder: Embedder, data: LabeledSet, chunk: int) -> dict[str, Any]:
    """What must match for a folder to be resumed or reused rather than refused."""
    return {
        "format": FORMAT,
        "backbone_hash": embedder.backbone["hash"],
        "pooling": embedder.pooling,
        "image_size": embedder.image_size,
        "data_fingerprint": data.fingerprint(),
        "chunk_size": chunk,
    }


def _check_same(found: dict, wanted: dict, where: Path) -> None:
    """Refuse a folder holding another backbone's (or other data's) embeddings: never mix them."""
    theirs = found.get("identity", found)
    if theirs.get("backbone_hash") != wanted["backbone_hash"]:
        spec = (found.get("backbone") or {}).get("spec") or theirs.get("spec", "another backbone")
        raise EmbeddingsError(
            f"{where} holds embeddings of another backbone ({spec}, hash "
            f"{theirs.get('backbone_hash')}; this one is {wanted['backbone_hash']}): "
            "choose another --out (embeddings of different backbones are never mixed)"
        )
    changed = [k for k in wanted if k != "chunk_size" and theirs.get(k) != wanted[k]]
    if changed:
        key = changed[0]
        what = (
            "of other images (or the images changed since)"
            if key == "data_fingerprint"
            else f"made with another {key.replace('_', ' ')} ({theirs.get(key)!r}, now {wanted[key]!r})"
        )
        again = f"; or delete {where / PARTS} to start this run over" if (where / PARTS / META).exists() else ""
        raise EmbeddingsError(f"{where} holds embeddings {what}: choose another --out{again}")


def embed_folder(embedder: Embedder, data_spec: str, out: str | Path, chunk_size: int = 0) -> dict[str, Any]:
    """Embed every image of ``data_spec`` into the folder ``out`` (resuming a run interrupted there);
    returns meta.json's content. A complete folder of the same backbone and data is returned as it is."""
    from filelock import FileLock, Timeout

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EmbeddingsError(f"--out {out}: is a file, not a folder")
    data = load_images(data_spec)
    chunk = _chunk_size(chunk_size, embedder.batch_size)
    wanted = _identity(embedder, data, chunk)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(out / LOCK), timeout=0):
            done = _read_json(out / META)
            if done is not None:
                _check_same(done, wanted, out)
                shutil.rmtree(out / PARTS, ignore_errors=True)  # a crash after meta.json: the parts are spent
                log.info("%s: already holds these %d embeddings", out, done["count"])
                return done
            _refuse_foreign_files(out)
            started = _read_json(out / PARTS / META)
            if started is not None:  # resume: the parts are numbered by the chunk size they were made with
                _check_same(started, wanted, out)
                chunk = wanted["chunk_size"] = int(started["identity"]["chunk_size"])
            _embed_chunks(embedder, data, out / PARTS, chunk, wanted)
            meta = _assemble(embedder, data, out, chunk, wanted)
            shutil.rmtree(out / PARTS)
            return meta
    except Timeout:
        raise EmbeddingsError(f"{out}: another embed is writing there (lock {out / LOCK})") from None


def _chunk_size(chunk_size: int, batch_size: int) -> int:
    """A whole number of batches, so a chunked run batches the images exactly as the evaluators do."""
    if chunk_size < 0 or batch_size < 1:
        raise EmbeddingsError(f"--chunk-size must be >= 0 and --batch-size >= 1, got {chunk_size} and {batch_size}")
    batches = -(-chunk_size // batch_size) if chunk_size else DEFAULT_CHUNK_BATCHES
    return batches * batch_size


def _refuse_foreign_files(out: Path) -> None:
    """Output files without meta.json and without parts to resume from were not written by this run."""
    strays = [name for name in (EMBEDDINGS, IDS, INDEX) if (out / name).exists()]
    if strays and not (out / PARTS / META).exists():
        raise EmbeddingsError(
            f"{out}: holds {strays[0]} but no {META} (not a complete embeddings folder, nor one "
            "to resume): choose another --out"
        )


def _embed_chunks(embedder: Embedder, data: LabeledSet, parts: Path, chunk: int, wanted: dict) -> None:
    """Embed the chunks not yet saved under ``parts``; each chunk file appears whole (temp + rename)."""
    from tqdm import tqdm

    from ssl_hybrid.runs import write_json_atomic

    if not (parts / META).exists():
        write_json_atomic(parts / META, {"identity": wanted, "backbone": embedder.describe()["backbone"]})
    starts = range(0, len(data), chunk)
    todo = [i for i, _ in enumerate(starts) if not (parts / _part_name(i)).exists()]
    if len(todo) < len(starts):
        log.info("resuming: %d of %d chunks already embedded in %s", len(starts) - len(todo), len(starts), parts)
    bar = tqdm(
        total=len(data),
        initial=min(len(data), (len(starts) - len(todo)) * chunk),
        unit="img",
        desc="embed",
        disable=not embedder.progress,
    )
    for i in todo:
        positions = np.arange(starts[i], min(len(data), starts[i] + chunk))
        subset = data.subset(positions)
        # unreadable images (by the decoder the model's loader uses): dropped and counted (or too many: one error)
        checked = check_images(subset, channels=embedder.channels)
        lost = checked.skipped[len(subset.skipped) :]
        bad = {item["id"] for item in lost}
        kept = np.array([p for p, s in zip(positions, subset.samples) if s.id not in bad], dtype=np.int64)
        features = embedder.features(checked) if len(checked) else np.zeros((0, 0), np.float32)
        _save_part(parts / _part_name(i), features, kept, lost)
        bar.update(len(positions))
    bar.close()


def _part_name(index: int) -> str:
    return f"chunk_{index:06d}.npz"


def _save_part(path: Path, features: np.ndarray, positions: np.ndarray, skipped: list[dict]) -> None:
    import json

    with atomic_path(path) as tmp:
        np.savez(
            tmp,
            features=features,
            positions=positions,
            dim=np.array(features.shape[1]),
            skipped=np.array(json.dumps(skipped)),
        )


def _load_part(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as part:
        return part["features"], part["positions"]


def _part_summary(path: Path) -> tuple[int, int, list[dict]]:
    """(rows, dim, skipped) of a part without reading its features (npz members load one at a time)."""
    import json

    with np.load(path) as part:
        return len(part["positions"]), int(part["dim"]), json.loads(str(part["skipped"]))


def _assemble(embedder: Embedder, data: LabeledSet, out: Path, chunk: int, wanted: dict) -> dict[str, Any]:
    """Join the parts into embeddings.npy, ids.csv and index.faiss (each via a temp name), then meta.json."""
    from ssl_hybrid.runs import write_json_atomic

    parts = [out / PARTS / _part_name(i) for i in range(len(range(0, len(data), chunk)))]
    rows, dim = 0, 0
    skipped: list[dict] = []
    for path in parts:  # first pass: sizes only, the features stay on disk
        count, width, lost = _part_summary(path)
        rows, dim, skipped = rows + count, dim or (width if count else 0), skipped + lost
    if rows == 0:
        raise EmbeddingsError(f"{data.source}: no readable image to embed")
    with contextlib.ExitStack() as renames:  # a failed write (full disk) leaves no temp file; the parts stay
        tmp = {name: renames.enter_context(atomic_path(out / name)) for name in (EMBEDDINGS, IDS, INDEX)}
        _write_outputs(data, parts, tmp, rows, dim)
    labeled = any(s.label != UNLABELED for s in data.samples)
    meta = dict(
        format=FORMAT,
        count=rows,
        dim=dim,
        **embedder.describe(),
        data={"source": data.source, "images": len(data), "labeled": labeled, "classes": data.classes},
        skipped_unreadable=skipped,
        index={"file": INDEX, "type": "IndexFlatIP", "metric": "inner_product"},
        files={"embeddings": EMBEDDINGS, "ids": IDS},
        identity=wanted,
    )
    write_json_atomic(out / META, meta)
    log.debug(
        "%s: %d x %d embeddings, %d unreadable image(s) skipped", out, rows, dim, len(skipped)
    )  # `embed` prints it
    return meta


def _write_outputs(data: LabeledSet, parts: list[Path], tmp: dict[str, Path], rows: int, dim: int) -> None:
    """embeddings.npy (memory-mapped, filled chunk by chunk), ids.csv and the FAISS index, at the temp names."""
    import faiss

    matrix = np.lib.format.open_memmap(tmp[EMBEDDINGS], mode="w+", dtype=np.float32, shape=(rows, dim))
    index = faiss.IndexFlatIP(dim)
    row = 0
    with open(tmp[IDS], "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(ID_COLUMNS)
        for path in parts:
            features, positions = _load_part(path)
            if not len(positions):
                continue
            matrix[row : row + len(positions)] = features
            index.add(np.ascontiguousarray(features, dtype=np.float32))
            writer.writerows(_id_row(data, int(p)) for p in positions)
            row += len(positions)
    matrix.flush()
    del matrix
    faiss.write_index(index, str(tmp[INDEX]))


def _id_row(data: LabeledSet, position: int) -> tuple:
    sample = data.samples[position]
    name = data.classes[sample.label] if sample.label != UNLABELED else ""
    return sample.id, sample.label, name, sample.path, sample.offset, sample.size


# ---------------------------------------------------------------------------------------------
# Reading a folder back
# ---------------------------------------------------------------------------------------------


@dataclass
class Embeddings:
    folder: Path
    meta: dict[str, Any]
    vectors: np.ndarray  # memory-mapped [N, D]
    items: LabeledSet  # the rows of ids.csv as samples (so images can be loaded for grids)

    def index(self):
        import faiss

        return faiss.read_index(str(self.folder / INDEX))

    def class_of(self, row: int) -> str:
        label = self.items.samples[row].label
        return self.items.classes[label] if label != UNLABELED else ""


def open_embeddings(folder: str | Path) -> Embeddings:
    folder = Path(folder)
    meta = _read_json(folder / META)
    if meta is None:
        partial = " (an unfinished run: run embed again to finish it)" if (folder / PARTS).exists() else ""
        raise EmbeddingsError(f"{folder}: no {META}: not an embeddings folder written by `ssl-hybrid embed`{partial}")
    vectors = np.load(folder / EMBEDDINGS, mmap_mode="r")
    classes = list(meta["data"].get("classes") or [])
    with open(folder / IDS, newline="", encoding="utf-8") as handle:
        samples = [
            Sample(id=r["id"], label=int(r["label"]), path=r["path"], offset=int(r["offset"]), size=int(r["size"]))
            for r in csv.DictReader(handle)
        ]
    if len(samples) != len(vectors):
        raise EmbeddingsError(f"{folder}: {IDS} has {len(samples)} rows for {len(vectors)} embeddings")
    return Embeddings(folder, meta, vectors, LabeledSet(meta["data"]["source"], classes, samples))


def embedder_for(embeddings: Embeddings, batch_size: int = EvalConfig.batch_size, num_workers: int = 0) -> Embedder:
    """The backbone that wrote the folder, checked by its content hash (a changed file is refused)."""
    meta = embeddings.meta
    embedder = load_embedder(meta["backbone"]["spec"], meta["image_size"], meta["pooling"], batch_size, num_workers)
    if embedder.backbone["hash"] != meta["backbone"]["hash"]:
        raise EmbeddingsError(
            f"{meta['backbone']['spec']}: the backbone changed since {embeddings.folder} was written "
            f"(hash {embedder.backbone['hash']}, folder {meta['backbone']['hash']}): embed again"
        )
    return embedder


# ---------------------------------------------------------------------------------------------
# neighbors and near-duplicates
# ---------------------------------------------------------------------------------------------


def resolve_queries(embeddings: Embeddings, queries: Sequence[str]) -> tuple[list[str], list[int], LabeledSet]:
    """Split queries into ids of the folder (their row) and image files/folders to embed.

    Returns (query names in order, row per query or -1 when it is an image, the images as one set)."""
    from ssl_hybrid.data.labeled import LabeledDataError

    rows_by_id = {s.id: i for i, s in enumerate(embeddings.items.samples)}
    names, rows, images = [], [], []
    for query in queries:
        if query in rows_by_id:
            names.append(query)
            rows.append(rows_by_id[query])
            continue
        if not Path(query).exists():
            raise EmbeddingsError(f"query '{query}': neither an image file nor an id in {embeddings.folder / IDS}")
        try:
            found = load_images(query)
        except LabeledDataError as err:
            raise EmbeddingsError(f"query '{query}': {err}") from None
        for sample in found.samples:  # a folder query stands for each of its images
            names.append(sample.path)
            rows.append(-1)
            images.append(
                Sample(id=sample.path, label=UNLABELED, path=sample.path, offset=sample.offset, size=sample.size)
            )
    return names, rows, LabeledSet("queries", [], images)


def query_vectors(
    embeddings: Embeddings, rows: list[int], images: LabeledSet, embedder: Embedder | None = None, **loading
) -> np.ndarray:
    """[Q, D]: stored rows for ids, freshly embedded (same backbone, checked) vectors for images; the
    backbone is loaded only when there are images (``loading``: embedder_for's batch_size, num_workers)."""
    vectors = np.zeros((len(rows), embeddings.vectors.shape[1]), dtype=np.float32)
    stored = [i for i, row in enumerate(rows) if row >= 0]
    vectors[stored] = embeddings.vectors[[rows[i] for i in stored]]
    if len(images):
        embedder = embedder or embedder_for(embeddings, **loading)
        # a query the user named must be readable, by the decoder the model's loader uses
        checked = check_images(images, max_skip_rate=0.0, channels=embedder.channels)
        vectors[[i for i, row in enumerate(rows) if row < 0]] = embedder.features(checked)
    return vectors


def nearest(
    embeddings: Embeddings, queries: Sequence[str], k: int = 10, embedder: Embedder | None = None, **loading
) -> list[dict[str, Any]]:
    """The k nearest images of each query (an id of the folder, or an image file/folder), by cosine
    similarity, most similar first. An id query does not return itself."""
    from ssl_hybrid.eval.knn import faiss_threads

    if k < 1:
        raise EmbeddingsError(f"-k must be >= 1, got {k}")
    names, rows, images = resolve_queries(embeddings, queries)
    vectors = query_vectors(embeddings, rows, images, embedder, **loading)
    extra = int(any(row >= 0 for row in rows))  # one more, to drop the query itself
    with faiss_threads():
        similarities, indices = embeddings.index().search(vectors, min(k + extra, len(embeddings.vectors)))
    results = []
    for name, row, sims, found in zip(names, rows, similarities, indices):
        keep = [(float(s), int(i)) for s, i in zip(sims, found) if i >= 0 and i != row][:k]
        results.append(
            {
                "query": name,
                "query_row": row if row >= 0 else None,
                "neighbours": [_neighbour(embeddings, rank, s, i) for rank, (s, i) in enumerate(keep, 1)],
            }
        )
    return results


def _neighbour(embeddings: Embeddings, rank: int, similarity: float, row: int) -> dict[str, Any]:
    sample = embeddings.items.samples[row]
    return {
        "rank": rank,
        "row": row,
        "id": sample.id,
        "similarity": similarity,
        "label": sample.label,
        "class": embeddings.class_of(row),
        "path": sample.path,
    }


def duplicates(embeddings: Embeddings, threshold: float, block: int = 4096) -> list[dict[str, Any]]:
    """Pairs of different images with cosine similarity >= threshold, most similar first (exact search,
    ``block`` query rows at a time so memory stays bounded)."""
    from ssl_hybrid.eval.knn import faiss_threads

    if not -1.0 <= threshold <= 1.0:
        raise EmbeddingsError(f"--duplicates must be a cosine similarity in [-1, 1], got {threshold}")
    index, pairs = embeddings.index(), []
    # faiss's range search keeps similarities strictly above the radius: step just below the threshold.
    radius = float(np.nextafter(np.float32(threshold), np.float32(-2)))
    with faiss_threads():
        for start in range(0, len(embeddings.vectors), block):
            queries = np.ascontiguousarray(embeddings.vectors[start : start + block], dtype=np.float32)
            limits, sims, found = index.range_search(queries, radius)
            for q in range(len(queries)):
                a = start + q
                for s, b in zip(sims[limits[q] : limits[q + 1]], found[limits[q] : limits[q + 1]]):
                    if b > a and s >= threshold:
                        pairs.append((float(s), a, int(b)))
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    samples = embeddings.items.samples
    return [{"similarity": s, "a": samples[a].id, "b": samples[b].id, "row_a": a, "row_b": b} for s, a, b in pairs]


# ---------------------------------------------------------------------------------------------
# Pictures: neighbour grid, 2-D map
# ---------------------------------------------------------------------------------------------


MAX_GRID_ROWS = 32  # a picture of more queries is too tall to look at; the table and --out hold them all


def neighbour_grid(embeddings: Embeddings, results: list[dict[str, Any]], path: str | Path, thumb: float = 1.4) -> Path:
    """One row per query (the first MAX_GRID_ROWS): the query, then its neighbours with their similarity
    and class (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import ImageOps

    path = Path(path)
    if len(results) > MAX_GRID_ROWS:
        log.warning("the grid shows the first %d of %d queries", MAX_GRID_ROWS, len(results))
        results = results[:MAX_GRID_ROWS]
    cols = 1 + max((len(r["neighbours"]) for r in results), default=0)
    fig, axes = plt.subplots(len(results), cols, figsize=(thumb * cols, (thumb + 0.35) * len(results)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for row, result in enumerate(results):
        query_row = result["query_row"]
        image = (
            embeddings.items.load_picture(query_row)
            if query_row is not None
            else LabeledSet("query", [], [Sample(result["query"], UNLABELED, result["query"])]).load_picture(0)
        )
        axes[row, 0].imshow(ImageOps.fit(image, (128, 128)))
        axes[row, 0].set_title("query\n" + _short(Path(result["query"]).name), fontsize=7)
        for col, item in enumerate(result["neighbours"], 1):
            axes[row, col].imshow(ImageOps.fit(embeddings.items.load_picture(item["row"]), (128, 128)))
            axes[row, col].set_title(
                f"{item['similarity']:.3f}\n{_short(item['class'] or Path(item['id']).name)}", fontsize=7
            )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path


def _short(text: str, width: int = 18) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


MAX_MAP_POINTS = 20000  # a PCA/UMAP of a seeded sample: the picture of a larger set looks the same


def plot_map(embeddings: Embeddings, path: str | Path, method: str = "auto", seed: int = 0) -> dict[str, Any]:
    """A 2-D map of the embeddings (UMAP where the ``umap`` package is installed, PCA otherwise), one colour
    per class when the images are labeled. Returns what was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    n = len(embeddings.vectors)
    picked = np.sort(np.random.default_rng(seed).choice(n, size=min(n, MAX_MAP_POINTS), replace=False))
    vectors = np.asarray(embeddings.vectors[picked], dtype=np.float32)
    points, used = _project(vectors, method, seed)
    labels = np.array([embeddings.items.samples[i].label for i in picked])
    classes = embeddings.items.classes
    fig, ax = plt.subplots(figsize=(7, 6))
    if (labels != UNLABELED).any():
        cmap = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
        for label in np.unique(labels):
            chosen = labels == label
            name = classes[label] if label != UNLABELED else "unlabeled"
            ax.scatter(
                points[chosen, 0],
                points[chosen, 1],
                s=8,
                color=cmap(label % cmap.N) if label != UNLABELED else "0.6",
                label=name,
            )
        if len(classes) <= 20:
            ax.legend(fontsize=7, markerscale=2, loc="best")
    else:
        ax.scatter(points[:, 0], points[:, 1], s=8, color="tab:blue")
    backbone = embeddings.meta["backbone"]
    ax.set_title(
        f"{used.upper()} of {len(picked)} embeddings ({backbone.get('model')}, {embeddings.meta['pooling']} pooling)",
        fontsize=9,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return {
        "path": str(path),
        "method": used,
        "points": int(len(picked)),
        "coloured_by_label": bool((labels != UNLABELED).any()),
    }


def _project(vectors: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, str]:
    """[N, 2] coordinates: UMAP when asked for or (auto) importable, else PCA (the two leading components)."""
    if method not in ("auto", "umap", "pca"):
        raise EmbeddingsError(f"map method must be auto, umap or pca, got {method!r}")
    if method != "pca" and len(vectors) > 3:
        try:
            import umap  # optional extra: pip install umap-learn
        except ImportError:
            if method == "umap":
                raise EmbeddingsError("umap is not installed (pip install umap-learn), use pca") from None
        else:
            reducer = umap.UMAP(
                n_components=2, metric="cosine", random_state=seed, n_neighbors=min(15, len(vectors) - 1)
            )
            return np.asarray(reducer.fit_transform(vectors)), "umap"
    centred = vectors - vectors.mean(0, keepdims=True)
    _, _, components = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    points = centred @ components[:2].T
    if points.shape[1] < 2:  # a single dimension (or a single point): put it on a line
        points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    return points, "pca"
