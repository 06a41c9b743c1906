"""The one loader for backbones to evaluate: ``load_backbone_spec(spec) -> (model, meta)``.

Accepted specs:

- a run directory: its exported ``backbone.safetensors`` (+ ``backbone.json``), or else the model
  weights in the newest complete ``checkpoints/step_*/``;
- a ``backbone.safetensors`` path (its ``backbone.json`` next to it says which model to build);
- ``timm:<name>``: a timm model with pretrained=False (there is no network at run time, so this is a
  random init too; it exists so any timm architecture can be named explicitly);
- ``random:<name>``: random initialization (seeded, so baselines are reproducible), e.g. ``random:hybrid_tiny``.

Weights are loaded from safetensors only (never pickles). Missing keys are an error (the model would be
silently part-random); unexpected keys (e.g. a projection head saved alongside) are reported and ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import torch

from ssl_hybrid.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 224  # timm:/random: models have no pretraining size; 224 is where timm quotes numbers
BACKBONE_WEIGHTS = "backbone.safetensors"
BACKBONE_META = "backbone.json"
RANDOM_INIT_SEED = 0


class BackboneError(UserError):
    """A backbone spec that cannot be loaded."""


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
        model = _create(name, {}, size, spec)
        meta = {"spec": spec, "kind": kind, "model": name, "image_size": size, "weights": None,
                "missing_keys": [], "unexpected_keys": []}
    else:
        weights, model_meta = _locate_weights(Path(spec))
        name, kwargs = _model_name_and_kwargs(model_meta, weights)
        size = image_size or _pretrained_size(model_meta)
        model = _create(name, kwargs, size, spec)
        missing, unexpected = _load_weights(model, weights)
        meta = {"spec": spec, "kind": "file", "model": name, "image_size": size, "weights": str(weights),
                "missing_keys": missing, "unexpected_keys": unexpected, "pretraining": _pretraining(model_meta)}
    model.eval()
    meta["num_features"] = int(model.num_features)
    meta["hash"] = model_hash(model)
    return model, meta


def _create(name: str, kwargs: dict[str, Any], image_size: int, spec: str) -> torch.nn.Module:
    import timm

    import ssl_hybrid.models  # noqa: F401  (registers hybrid_* with timm)
    from ssl_hybrid.models.factory import create_backbone

    if not timm.is_model(name):
        raise BackboneError(f"'{spec}': unknown model '{name}' (timm.list_models() lists the known ones)")
    return create_backbone(name, image_size, **kwargs)


def _locate_weights(path: Path) -> tuple[Path, dict[str, Any]]:
    if not path.exists():
        raise BackboneError(f"{path}: backbone not found (expected a run directory, a .safetensors file, "
                            "timm:<name> or random:<name>)")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise BackboneError(f"{path}: weights must be a .safetensors file (pickled checkpoints are not loaded)")
        return path, _read_meta(path.parent / BACKBONE_META)
    if (path / BACKBONE_WEIGHTS).exists():
        return path / BACKBONE_WEIGHTS, _read_meta(path / BACKBONE_META)
    checkpoint = _newest_checkpoint(path)
    if checkpoint is None:
        raise BackboneError(f"{path}: no {BACKBONE_WEIGHTS} and no complete checkpoints/step_*/ with model weights")
    meta = _read_meta(checkpoint / BACKBONE_META) or _read_meta(path / BACKBONE_META) or _meta_from_config(path)
    return _checkpoint_weights(checkpoint), meta


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
    for name in (BACKBONE_WEIGHTS, "model.safetensors"):
        if (step / name).exists():
            return step / name
    raise BackboneError(f"{step}: no {BACKBONE_WEIGHTS} or model.safetensors in the checkpoint")


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BackboneError(f"{path}: malformed JSON ({err.msg} at line {err.lineno})") from None


def _meta_from_config(run: Path) -> dict[str, Any]:
    """A run without backbone.json: the model name and image size come from its config.yaml."""
    config = run / "config.yaml"
    if not config.exists():
        return {}
    import yaml

    values = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    return {"model": values.get("model", {}).get("name"), "image_size": values.get("data", {}).get("image_size")}


def _pretraining(meta: dict[str, Any]) -> dict[str, Any] | None:
    """What the trainer recorded at export: run name, steps done, objective weights, budget and time."""
    record = {k: meta[k] for k in ("run", "step", "objective") if k in meta}
    record.update(meta.get("pretraining") or {})
    return record or None


def _pretrained_size(meta: dict[str, Any]) -> int:
    """``image_size`` recorded by the trainer, else the exported ``img_size``, else 224."""
    size = meta.get("image_size") or meta.get("img_size") or (meta.get("factory_kwargs") or {}).get("img_size")
    if isinstance(size, (list, tuple)):
        size = size[0] if size else None
    return int(size or DEFAULT_IMAGE_SIZE)


def _model_name_and_kwargs(meta: dict[str, Any], weights: Path) -> tuple[str, dict[str, Any]]:
    name = meta.get("model") or meta.get("model_name") or meta.get("name") or meta.get("architecture")
    if not name:
        raise BackboneError(f"{weights}: no {BACKBONE_META} next to it naming the model; "
                            "write one with {\"model\": \"<timm name>\", \"image_size\": <px>}")
    # The exporter's factory_kwargs are exactly what the model was built with; the trainer's kwargs a subset.
    kwargs = meta.get("factory_kwargs") or meta.get("kwargs") or meta.get("model_kwargs") or {}
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained", "num_classes", "img_size")}
    return str(name), kwargs


def _load_weights(model: torch.nn.Module, weights: Path) -> tuple[list[str], list[str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise BackboneError(f"{weights}: unreadable safetensors file ({err})") from None
    state = _strip_prefix(state, model)
    # timm's convention (ViTs, our hybrids): the model's module adapts a state dict to the built model,
    # e.g. resamples position embeddings when evaluating at another image size than pretraining.
    adapt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if adapt is not None:
        state = adapt(state, model)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches raise even with strict=False
        first = str(err).strip().splitlines()[-1].strip()
        raise BackboneError(f"{weights}: weights do not fit the model ({first})") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if unexpected:
        log.warning("%s: %d unexpected keys ignored (e.g. %s)", weights, len(unexpected), ", ".join(unexpected[:3]))
    if missing:
        raise BackboneError(f"{weights}: {len(missing)} model keys missing from the weights "
                            f"(e.g. {', '.join(missing[:3])}); wrong model name or image size in {BACKBONE_META}?")
    return missing, unexpected


def _strip_prefix(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainer checkpoints may hold the backbone as ``backbone.*`` / ``student.backbone.*``: keep that part."""
    expected = set(model.state_dict())
    if expected & set(state):
        return state
    for prefix in ("module.", "backbone.", "student.backbone.", "model.backbone.", "encoder."):
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if expected & set(stripped):
            return stripped
    return state


def model_hash(model: torch.nn.Module) -> str:
    """Content hash of the architecture and every parameter/buffer: the feature cache's backbone key."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
