"""Classify images: with a fine-tuned classifier folder, or with a backbone and a small labeled bank (k-NN).

``predict_with_bank`` is the k-NN evaluator's protocol applied to new images: the bank and the images go
through ``features_for_spec`` (same transform, pooling and cache as ``ssl-hybrid knn``) and ``knn_predict``
scores them (k = 20, T = 0.07, votes exp(sim / T)); a class's probability is its share of the vote weight.
``predict_with_model`` runs a classifier saved by ``finetune`` (``ssl_hybrid.models.export.load_model``) with
the preprocessing recorded in its folder; probabilities are the softmax of its logits.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ssl_hybrid.config import EvalConfig
from ssl_hybrid.data.labeled import UNLABELED, LabeledSet, Sample, check_images, load_images
from ssl_hybrid.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TOP = 5


def image_set(specs: Sequence[str]) -> LabeledSet:
    """The images named on a command line (files, folders, lists or shards) as one set, ids = where they are."""
    from ssl_hybrid.data.labeled import LabeledDataError

    samples = []
    for spec in specs:
        if not Path(spec).exists() and "{" not in spec:
            raise UserError(f"{spec}: not found (expected an image, a folder of images, an image list or shards)")
        try:
            found = load_images(spec)
        except LabeledDataError as err:
            raise UserError(str(err)) from None
        samples += [
            Sample(
                id=s.path if s.offset < 0 else f"{s.path}:{s.id}",
                label=UNLABELED,
                path=s.path,
                offset=s.offset,
                size=s.size,
            )
            for s in found.samples
        ]
    return LabeledSet(", ".join(specs), [], samples)


def top_classes(
    probabilities: np.ndarray, classes: Sequence[str], images: LabeledSet, top: int
) -> list[dict[str, Any]]:
    """One row per image: its ``top`` classes, most probable first (ties: lower class index first)."""
    top = max(1, min(top, probabilities.shape[1]))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top]
    return [
        {"image": sample.id, "top": [{"class": classes[c], "label": int(c), "probability": float(p[c])} for c in ranks]}
        for sample, p, ranks in zip(images.samples, probabilities, order)
    ]


def predict_with_bank(
    spec: str,
    bank_spec: str,
    images: Sequence[str],
    *,
    k: int = EvalConfig.knn_k,
    temperature: float = EvalConfig.knn_temperature,
    top: int = DEFAULT_TOP,
    image_size: int | None = None,
    pooling: str = EvalConfig.pooling,
    batch_size: int = EvalConfig.batch_size,
    num_workers: int = 0,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """k-NN classification of ``images`` against the labeled ``bank_spec`` (folder with class sub-folders or
    labeled shards), the evaluators' protocol; unreadable images are skipped and counted."""
    from ssl_hybrid.data.labeled import load_labeled
    from ssl_hybrid.eval.backbones import native_channels
    from ssl_hybrid.eval.features import features_for_spec
    from ssl_hybrid.eval.knn import faiss_threads, knn_predict

    if k < 1 or temperature <= 0 or (image_size or 0) < 0:
        raise UserError(
            f"-k must be >= 1, --temperature > 0 and --image-size >= 0, got {k}, {temperature} and {image_size}"
        )
    queries = image_set(images)  # a mistyped image path fails before anything is loaded
    channels = native_channels(spec)  # checked with the decoder the model's loader uses
    bank = check_images(load_labeled(bank_spec), channels=channels)
    queries = check_images(queries, channels=channels)
    meta, ((bank_f, bank_y), (query_f, _)) = features_for_spec(
        spec, [bank, queries], image_size, batch_size, num_workers, cache_dir, progress, pooling
    )
    with faiss_threads():
        scores = knn_predict(bank_f, bank_y, query_f, k=k, temperature=temperature, num_classes=len(bank.classes))
    probabilities = scores / scores.sum(1, keepdims=True)
    return {
        "mode": "knn",
        "backbone": {key: meta.get(key) for key in ("spec", "model", "hash", "image_size")},
        "pooling": meta["pooling"],
        "bank": {"source": bank.source, "images": len(bank), "classes": len(bank.classes)},
        "k": min(k, len(bank)),
        "temperature": temperature,
        "predictions": top_classes(probabilities, bank.classes, queries, top),
        "skipped_unreadable": queries.skipped,
    }


def predict_with_model(
    folder: str,
    images: Sequence[str],
    *,
    top: int = DEFAULT_TOP,
    batch_size: int = EvalConfig.batch_size,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """The classifier's softmax over its ``label_names`` for each image (unreadable ones skipped, counted)."""
    import torch

    from ssl_hybrid.eval.features import eval_device, extract_features, input_channels, make_loader
    from ssl_hybrid.models.export import RECORD_KEY

    model, config = _load_classifier(folder)
    transform = classifier_transform(config)
    queries = check_images(image_set(images), channels=input_channels(config.get(RECORD_KEY) or {}))
    loader = make_loader(queries, transform, batch_size, num_workers)
    logits, _ = extract_features(model.to(eval_device()), loader, progress=progress, forward=lambda m, x: m(x))
    probabilities = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    names = list(config["label_names"])
    return {
        "mode": "classifier",
        "model": str(folder),
        "classes": len(names),
        "predictions": top_classes(probabilities, names, queries, top),
        "skipped_unreadable": queries.skipped,
    }


BANK_HINT = "to classify with a backbone, give a few labeled images per class: predict BACKBONE IMAGES --bank FOLDER"


def _load_classifier(folder: str):
    from ssl_hybrid.models.export import BackboneLoadError, load_model

    if not Path(folder).exists():
        raise UserError(f"{folder}: classifier folder not found ({BANK_HINT})")
    try:
        model, config = load_model(folder)
    except BackboneLoadError as err:
        raise UserError(f"{err} ({BANK_HINT})") from None
    names = config.get("label_names")
    if not names:
        raise UserError(f"{folder}: holds no classifier (no label_names in its config.json); {BANK_HINT}")
    classes = getattr(model, "num_classes", None)
    if classes is not None and classes != len(names):
        raise UserError(f"{folder}: the classifier has {classes} outputs but config.json names {len(names)} classes")
    return model.eval(), config


def classifier_transform(config: dict[str, Any]):
    """The evaluation transform with the folder's own size, crop and normalisation (``pretrained_cfg``)."""
    from ssl_hybrid.eval.features import eval_transform, transform_for
    from ssl_hybrid.models.export import RECORD_KEY

    cfg = config.get("pretrained_cfg") or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    record = config.get(RECORD_KEY) or {}
    if record.get("normalization"):  # N-channel arrays, normalised with the pretraining data's statistics
        return transform_for(record, int(size), crop_pct=cfg.get("crop_pct"))
    return eval_transform(int(size), mean=cfg.get("mean"), std=cfg.get("std"), crop_pct=cfg.get("crop_pct"))


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def prediction_table(result: dict[str, Any]) -> str:
    """Plain text: one line per image, its classes with probabilities."""
    rows = result["predictions"]
    width = min(60, max((len(r["image"]) for r in rows), default=5))
    lines = [f"{'image':<{width}}  top classes (probability)"]
    for row in rows:
        name = row["image"] if len(row["image"]) <= width else "…" + row["image"][-(width - 1) :]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{t['class']} {t['probability']:.3f}" for t in row["top"]))
    if result.get("skipped_unreadable"):
        lines.append(f"({len(result['skipped_unreadable'])} unreadable image(s) skipped)")
    return "\n".join(lines) + "\n"


def write_rows(path: str | Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> Path:
    """A CSV written through a temp file + rename (a crash never leaves half a file)."""
    from ssl_hybrid.runs import write_text_atomic

    def write(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    return write_text_atomic(path, write, newline="")


def prediction_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"image": row["image"], "rank": rank, "class": t["class"], "label": t["label"], "probability": t["probability"]}
        for row in result["predictions"]
        for rank, t in enumerate(row["top"], 1)
    ]


def write_result(path: str | Path, result: dict[str, Any], rows: list[dict[str, Any]], columns: Sequence[str]) -> Path:
    """``--out``: CSV when the name ends in .csv (``rows``), the whole result as JSON otherwise."""
    from ssl_hybrid.runs import write_json_atomic

    if str(path).lower().endswith(".csv"):
        return write_rows(path, rows, columns)
    return write_json_atomic(path, result)
