"""The evaluators' backbone loader: ``load_backbone_spec(spec) -> (model, meta)``.

Accepted specs:

- a run directory: its exported ``backbone.safetensors`` (+ ``backbone.json``), or else the model
  weights in the newest complete ``checkpoints/step_*/``;
- a ``backbone.safetensors`` path (its ``backbone.json`` next to it says which model to build);
- ``timm:<name>``: a timm model with pretrained=False (there is no network at run time, so this is a
  random init too; it exists so any timm architecture can be named explicitly);
- ``random:<name>``: random initialization (seeded, so baselines are reproducible), e.g. ``random:hybrid_tiny``.

Files are read by ``ssl_hybrid.models.export`` (the one backbone format and its reader). Weights are loaded
from safetensors only (never pickles). Missing keys are an error (the model would be silently part-random);
unexpected keys (e.g. a projection head saved alongside) are reported and ignored.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch

# Importing any ssl_hybrid.models submodule runs the package __init__, which registers hybrid_*/resvit_* with timm.
from ssl_hybrid.models.export import CHECKPOINT_BACKBONE_PREFIX, CHECKPOINT_WEIGHTS_NAME, META_NAME, WEIGHTS_NAME
from ssl_hybrid.models.export import BackboneLoadError as BackboneError
from ssl_hybrid.models.export import read_meta, read_meta_file, rebuild, upgrade_meta

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
        meta = {"spec": spec, "kind": kind, "model": name, "image_size": size, "weights": None,
                "missing_keys": [], "unexpected_keys": []}
    else:
        weights, prefix, model_meta = _locate_weights(Path(spec))
        size = image_size or _pretrained_size(model_meta)
        # Evaluated without a classifier: a head saved alongside is an unexpected key, reported and ignored.
        model, unexpected = rebuild(weights, model_meta, prefix=prefix, ignore_unexpected=True,
                                    num_classes=0, img_size=size)
        meta = {"spec": spec, "kind": "file", "model": model_meta["model_name"], "image_size": size,
                "weights": str(weights), "missing_keys": [], "unexpected_keys": unexpected,
                "pretraining": _pretraining(model_meta)}
    model.eval()
    meta["num_features"] = int(model.num_features)
    meta["hash"] = model_hash(model)
    return model, meta


def native_image_size(spec: str) -> int | None:
    """The size a saved backbone was pretrained at (what ``load_backbone_spec`` builds it for by default);
    None for ``timm:``/``random:``, which have none. Reads the metadata only."""
    if str(spec).startswith(("timm:", "random:")):
        return None
    return _pretrained_size(_locate_weights(Path(spec))[2])


def _create(name: str, image_size: int, spec: str) -> torch.nn.Module:
    import timm

    from ssl_hybrid.models.factory import create_backbone

    if not timm.is_model(name):
        raise BackboneError(f"'{spec}': unknown model '{name}' (timm.list_models() lists the known ones)")
    return create_backbone(name, image_size)


def _locate_weights(path: Path) -> tuple[Path, str, dict[str, Any]]:
    """(weights file, key prefix of the backbone in it, upgraded meta) for a file or run directory."""
    if not path.exists():
        raise BackboneError(f"{path}: backbone not found (expected a run directory, a .safetensors file, "
                            "timm:<name> or random:<name>)")
    if path.is_file() or (path / WEIGHTS_NAME).exists():
        weights, meta = read_meta(path)
        return weights, "", meta
    checkpoint = _newest_checkpoint(path)
    if checkpoint is None:
        raise BackboneError(f"{path}: no {WEIGHTS_NAME} and no complete checkpoints/step_*/ with model weights")
    meta_file = next((p for p in (checkpoint / META_NAME, path / META_NAME) if p.exists()), None)
    meta = read_meta_file(meta_file) if meta_file else upgrade_meta(_meta_from_config(path), path / "config.yaml")
    weights = _checkpoint_weights(checkpoint)
    return weights, CHECKPOINT_BACKBONE_PREFIX if weights.name == CHECKPOINT_WEIGHTS_NAME else "", meta


def _newest_checkpoint(run: Path) -> Path | None:
    steps = sorted((p for p in (run / "checkpoints").glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)),
                   key=lambda p: int(p.name.split("_")[1]), reverse=True)
    for step in steps:
        try:
            _checkpoint_weights(step)
            return step
        except BackboneError:
            continue
    return None


def _checkpoint_weights(step: Path) -> Path:
    for name in (WEIGHTS_NAME, CHECKPOINT_WEIGHTS_NAME):
        if (step / name).exists():
            return step / name
    raise BackboneError(f"{step}: no {WEIGHTS_NAME} or {CHECKPOINT_WEIGHTS_NAME} in the checkpoint")


def _meta_from_config(run: Path) -> dict[str, Any]:
    """A run without backbone.json: the model name and image size come from its config.yaml."""
    config = run / "config.yaml"
    if not config.exists():
        return {}
    import yaml

    values = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    return {"model_name": values.get("model", {}).get("name"), "image_size": values.get("data", {}).get("image_size")}


def _pretraining(meta: dict[str, Any]) -> dict[str, Any] | None:
    """What the trainer recorded at export: run name, steps done, objective weights, budget and time."""
    record = {k: meta[k] for k in ("run", "step", "objective") if k in meta}
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
