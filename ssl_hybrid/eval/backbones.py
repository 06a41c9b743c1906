"""The evaluators' backbone loader: ``load_backbone_spec(spec) -> (model, meta)``.

Accepted specs:

- a model folder (``model.safetensors`` + ``config.json``, ``ssl_hybrid.models.export``), or its
  ``model.safetensors`` path;
- a run directory: its newest weights by step, among its model folders (``model/`` written at the end of
  training, ``exports/*/`` by ``ssl-hybrid export``) and its newest complete ``checkpoints/step_*/``; an
  export has the same weights as the checkpoint of its step and wins a tie;
- an old export (``backbone.safetensors`` + ``backbone.json``, written before the model folder), or a
  directory holding one;
- ``timm:<name>``: a timm model with pretrained=False (there is no network at run time, so this is a
  random init too; it exists so any timm architecture can be named explicitly);
- ``random:<name>``: random initialization (seeded, so baselines are reproducible), e.g. ``random:hybrid_tiny``.

Files are read by ``ssl_hybrid.models.export``. Weights are loaded from safetensors only (never pickles).
Missing keys are an error (the model would be silently part-random); unexpected keys (a classifier head,
a projection head saved alongside) are reported and ignored. The evaluators pick their pooling themselves
(``eval.pooling``): a model folder saved with ``global_pool="multiscale"`` is rebuilt with the token pooling
it was trained with, so "default" keeps meaning the model's token pooling. ``meta["step"]`` is the training
step of the weights (None for ``timm:``/``random:``).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, cast

import torch

# Importing any ssl_hybrid.models submodule runs the package __init__, which registers hybrid_*/resvit_* with timm.
from ssl_hybrid.models.contract import TimmModel
from ssl_hybrid.models.export import (
    CHECKPOINT_BACKBONE_PREFIX,
    CHECKPOINT_WEIGHTS_NAME,
    CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    META_NAME,
    RECORD_KEY,
    build_from_folder,
    is_model_folder,
    read_meta,
    read_meta_file,
    read_model_config,
    rebuild,
    upgrade_meta,
)
from ssl_hybrid.models.export import BackboneLoadError as BackboneError

DEFAULT_IMAGE_SIZE = 224  # timm:/random: models have no pretraining size; 224 is where timm quotes numbers
RANDOM_INIT_SEED = 0


def load_backbone_spec(spec: str, image_size: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the model in eval mode; meta has name, kind, image_size, weights, missing/unexpected keys, hash.

    ``image_size`` overrides the size the model is built for (ViT-like models fix their position
    embeddings to it); by default the size recorded at pretraining, else 224.
    """
    spec = str(spec)
    if spec.startswith(("timm:", "random:")):
        kind, _, name = spec.partition(":")
        if not name:
            raise BackboneError(f"'{spec}': name a model after '{kind}:', e.g. {kind}:hybrid_tiny")
        size = image_size or DEFAULT_IMAGE_SIZE
        torch.manual_seed(RANDOM_INIT_SEED)
        model = _create(name, size, spec)
        meta = {
            "spec": spec,
            "kind": kind,
            "model": name,
            "image_size": size,
            "weights": None,
            "step": None,
            "missing_keys": [],
            "unexpected_keys": [],
        }
    else:
        path = _resolve(Path(spec))
        model, meta = _load_folder(path, image_size) if is_model_folder(path) else _load_files(path, image_size)
        meta["spec"] = spec
    model.eval()
    meta["num_features"] = int(cast(TimmModel, model).num_features)
    meta["hash"] = model_hash(model)
    return model, meta


def native_image_size(spec: str) -> int | None:
    """The size a saved backbone was pretrained at (what ``load_backbone_spec`` builds it for by default);
    None for ``timm:``/``random:``, which have none. Reads the metadata only."""
    if str(spec).startswith(("timm:", "random:")):
        return None
    path = _resolve(Path(spec))
    return (
        _folder_size(read_model_config(path)) if is_model_folder(path) else _pretrained_size(_locate_weights(path)[2])
    )


def native_channels(spec: str) -> int | None:
    """The channel count of the arrays a backbone pretrained on N-channel data takes (its recorded normalisation),
    None for an RGB backbone: what :func:`ssl_hybrid.data.labeled.check_images` checks images with. Reads the
    metadata only, so images are checked before the model is built."""
    from ssl_hybrid.eval.features import input_channels

    if str(spec).startswith(("timm:", "random:")):
        return None
    path = _resolve(Path(spec))
    record = (read_model_config(path).get(RECORD_KEY) or {}) if is_model_folder(path) else _locate_weights(path)[2]
    return input_channels(_normalization(record))


def _create(name: str, image_size: int, spec: str) -> torch.nn.Module:
    import timm

    from ssl_hybrid.models.factory import create_backbone

    if not timm.is_model(name):
        raise BackboneError(f"'{spec}': unknown model '{name}' (timm.list_models() lists the known ones)")
    return create_backbone(name, image_size)


def _resolve(path: Path) -> Path:
    """The model folder, old export or checkpoint a path stands for: a run directory resolves to its newest
    weights by step (see the module docstring)."""
    if not path.exists():
        raise BackboneError(
            f"{path}: backbone not found (expected a model folder, a run directory, timm:<name> or random:<name>)"
        )
    if path.is_file():
        return (
            path.parent
            if path.name in (CHECKPOINT_WEIGHTS_NAME, CONFIG_NAME) and is_model_folder(path.parent)
            else path
        )
    if is_model_folder(path) or _is_checkpoint(path):
        return path
    candidates = [(step, 2, folder) for folder, step in _model_folders(path)]
    if (path / LEGACY_WEIGHTS_NAME).exists():
        candidates.append((read_meta_file(path / META_NAME).get("step") or -1, 1, path))
    checkpoint = _newest_checkpoint(path)
    if checkpoint is not None:
        candidates.append((int(checkpoint.name.split("_")[1]), 0, checkpoint))
    if not candidates:
        raise BackboneError(
            f"{path}: no model folder ({CHECKPOINT_WEIGHTS_NAME} + {CONFIG_NAME}) and no complete "
            "checkpoints/step_*/ with model weights"
        )
    return max(candidates, key=lambda c: (c[0], c[1]))[2]


def _model_folders(run: Path) -> list[tuple[Path, int]]:
    """A run's model folders (``model/``, ``exports/*/``) with the step of their weights (-1 when unknown)."""
    folders = [run / "model", *sorted((run / "exports").glob("[!.]*"))]
    found = []
    for folder in folders:
        if is_model_folder(folder):
            step = (read_model_config(folder).get(RECORD_KEY) or {}).get("step")
            found.append((folder, int(step) if isinstance(step, int) else -1))
    return found


def _load_folder(folder: Path, image_size: int | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    config = read_model_config(folder)
    record = config.get(RECORD_KEY) or {}
    size = image_size or _folder_size(config)
    override: dict[str, Any] = {"num_classes": 0, "img_size": size}
    if config.get("model_args", {}).get("global_pool") == "multiscale":
        override["global_pool"] = record.get("token_pool", "token_avg")
    # Evaluated without a classifier: a head saved with it is an unexpected key, reported and ignored.
    model, unexpected = build_from_folder(folder, config, ignore_unexpected=True, **override)
    return model, {
        "kind": "file",
        "model": config["architecture"],
        "image_size": size,
        "weights": str(folder / CHECKPOINT_WEIGHTS_NAME),
        "step": record.get("step"),
        "missing_keys": [],
        "unexpected_keys": unexpected,
        "pretraining": _pretraining(record),
        **_normalization(record),
    }


def _folder_size(config: dict[str, Any]) -> int:
    """The size a model folder's model was trained at: the recorded image size, else its input size."""
    input_size = (config.get("pretrained_cfg") or {}).get("input_size") or [DEFAULT_IMAGE_SIZE]
    return int((config.get(RECORD_KEY) or {}).get("image_size") or input_size[-1])


def _load_files(path: Path, image_size: int | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """An old export (file or directory) or a checkpoint directory."""
    weights, prefix, model_meta = _locate_weights(path)
    size = image_size or _pretrained_size(model_meta)
    model, unexpected = rebuild(
        weights, model_meta, prefix=prefix, ignore_unexpected=True, num_classes=0, img_size=size
    )
    step = int(path.name.split("_")[1]) if _is_checkpoint(path) else model_meta.get("step")
    return model, {
        "kind": "file",
        "model": model_meta["model_name"],
        "image_size": size,
        "weights": str(weights),
        "step": step,
        "missing_keys": [],
        "unexpected_keys": unexpected,
        "pretraining": _pretraining(model_meta),
        **_normalization(model_meta),
    }


def _locate_weights(path: Path) -> tuple[Path, str, dict[str, Any]]:
    """(weights file, key prefix of the backbone in it, upgraded meta) for an old export or a checkpoint."""
    if path.is_file() or (path / LEGACY_WEIGHTS_NAME).exists():
        weights, meta = read_meta(path)
        return weights, "", meta
    run = path.parent.parent
    meta_file = next((p for p in (path / META_NAME, run / META_NAME) if p.exists()), None)
    meta = read_meta_file(meta_file) if meta_file else upgrade_meta(_meta_from_config(run), run / "config.yaml")
    weights = _checkpoint_weights(path)
    return weights, CHECKPOINT_BACKBONE_PREFIX if weights.name == CHECKPOINT_WEIGHTS_NAME else "", meta


def _is_checkpoint(path: Path) -> bool:
    return (
        path.is_dir() and re.fullmatch(r"step_\d+", path.name) is not None and (path / CHECKPOINT_WEIGHTS_NAME).exists()
    )


def _newest_checkpoint(run: Path) -> Path | None:
    steps = sorted(
        (p for p in (run / "checkpoints").glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)),
        key=lambda p: int(p.name.split("_")[1]),
        reverse=True,
    )
    for step in steps:
        try:
            _checkpoint_weights(step)
            return step
        except BackboneError:
            continue
    return None


def _checkpoint_weights(step: Path) -> Path:
    for name in (LEGACY_WEIGHTS_NAME, CHECKPOINT_WEIGHTS_NAME):
        if (step / name).exists():
            return step / name
    raise BackboneError(f"{step}: no {CHECKPOINT_WEIGHTS_NAME} in the checkpoint")


def _meta_from_config(run: Path) -> dict[str, Any]:
    """A run without backbone.json: the model name and image size come from its config.yaml."""
    config = run / "config.yaml"
    if not config.exists():
        return {}
    import yaml

    values = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    return {"model_name": values.get("model", {}).get("name"), "image_size": values.get("data", {}).get("image_size")}


def _normalization(record: dict[str, Any]) -> dict[str, Any]:
    """``{"normalization": ...}`` for a model pretrained on N-channel data (the evaluators' per-channel
    preprocessing, :func:`ssl_hybrid.eval.features.transform_for`), else nothing."""
    value = record.get("normalization")
    return {"normalization": value} if isinstance(value, dict) else {}


def _pretraining(meta: dict[str, Any]) -> dict[str, Any] | None:
    """What the trainer recorded at export: run name, steps done, objective weights, budget and time."""
    record: dict[str, Any] = {k: meta[k] for k in ("run", "step", "objective") if k in meta}
    record.update(meta.get("pretraining") or {})
    return record or None


def _pretrained_size(meta: dict[str, Any]) -> int:
    """``image_size`` recorded by the trainer, else the exported ``img_size``, else 224."""
    size = meta.get("image_size") or meta.get("img_size") or meta["factory_kwargs"].get("img_size")
    if isinstance(size, (list, tuple)):
        size = size[0] if size else None
    return int(size or DEFAULT_IMAGE_SIZE)


def model_hash(model: torch.nn.Module) -> str:
    """Content hash of the architecture and every parameter/buffer: the feature cache's backbone key."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# What every result records about the backbone it scored (from load_backbone_spec's meta).
SUMMARY_KEYS = ("spec", "model", "kind", "weights", "step", "image_size", "num_features", "hash")


def backbone_summary(meta: dict[str, Any], *extra: str) -> dict[str, Any]:
    """The :data:`SUMMARY_KEYS` of ``meta``, then ``extra`` keys."""
    return {key: meta.get(key) for key in (*SUMMARY_KEYS, *extra)}
