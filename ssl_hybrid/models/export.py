"""Save a backbone as ``backbone.safetensors`` + ``backbone.json`` and load it back strictly.

The JSON holds what is needed to rebuild the module without our code's defaults drifting:
the timm model name, the factory kwargs it was created with, ``img_size`` and ``num_features``,
plus whatever the caller adds (e.g. the ``image_size`` it was pretrained at, the run's step).
The weights also load through timm alone::

    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=".../backbone.safetensors"),
                      **meta["factory_kwargs"])
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ssl_hybrid.errors import UserError
from ssl_hybrid.models.hybrid import HybridViT, checkpoint_filter_fn
from ssl_hybrid.models.resvit import ResViT

WEIGHTS_NAME = "backbone.safetensors"
META_NAME = "backbone.json"
FORMAT_VERSION = 1


class BackboneLoadError(UserError):
    """A saved backbone is missing, malformed, or does not match the architecture it names."""


def _model_name(model: nn.Module) -> str:
    name = getattr(model, "model_name", None) or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not name:
        raise ValueError("cannot tell which timm model this is (no model_name / pretrained_cfg['architecture'])")
    return name


def _factory_kwargs(model: nn.Module) -> dict[str, Any]:
    kwargs = getattr(model, "factory_kwargs", None)
    if kwargs is None:  # a plain timm model: the class count is the one argument we can recover
        kwargs = {"num_classes": getattr(model, "num_classes", 0)}
    return json.loads(json.dumps(kwargs, default=list))  # tuples -> lists, fail early on non-JSON values


def save_backbone(model: nn.Module, directory: Union[str, os.PathLike], extra_meta: dict[str, Any] | None = None
                  ) -> tuple[Path, Path]:
    """Write ``backbone.safetensors`` and ``backbone.json`` into ``directory``; returns both paths.

    Files are written under temporary names and renamed, so a crash never leaves a half-written pair.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_path, meta_path = directory / WEIGHTS_NAME, directory / META_NAME
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    img_size = getattr(model, "img_size", None) or cfg.get("input_size", [0, 0, 0])[-2:]
    meta = dict(
        format_version=FORMAT_VERSION,
        model_name=_model_name(model),
        factory_kwargs=_factory_kwargs(model),
        img_size=list(img_size),
        num_features=int(getattr(model, "num_features", 0)),
        **(extra_meta or {}),
    )
    tmp_weights, tmp_meta = weights_path.with_suffix(".safetensors.tmp"), meta_path.with_suffix(".json.tmp")
    save_file(state, str(tmp_weights), metadata={"model_name": meta["model_name"]})
    tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp_weights, weights_path)
    os.replace(tmp_meta, meta_path)
    return weights_path, meta_path


def read_meta(path_or_dir: Union[str, os.PathLike]) -> tuple[Path, dict[str, Any]]:
    """Resolve ``(weights_path, meta)`` from a directory, the .safetensors or the .json path."""
    path = Path(path_or_dir)
    if not path.exists():
        raise BackboneLoadError(f"{path}: not found (expected a directory with {WEIGHTS_NAME} + {META_NAME})")
    directory = path if path.is_dir() else path.parent
    weights_path, meta_path = directory / WEIGHTS_NAME, directory / META_NAME
    if path.is_file() and path.suffix == ".safetensors":
        weights_path = path
    for needed in (weights_path, meta_path):
        if not needed.is_file():
            raise BackboneLoadError(f"{needed}: not found (a saved backbone is {WEIGHTS_NAME} + {META_NAME})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise BackboneLoadError(f"{meta_path}: not valid JSON ({err})") from err
    if "model_name" not in meta:
        raise BackboneLoadError(f"{meta_path}: no 'model_name' key")
    return weights_path, meta


def load_backbone(path_or_dir: Union[str, os.PathLike], **override_kwargs: Any) -> nn.Module:
    """Rebuild the saved model (``timm.create_model(name, **factory_kwargs)``) and load weights strictly.

    ``override_kwargs`` replace saved factory kwargs (e.g. ``num_classes=0``, ``img_size=96``; the
    position embedding is resampled when ``img_size`` changes). The model is returned in eval mode.
    Raises BackboneLoadError naming the missing/unexpected/mismatched keys when the weights do not
    fit the architecture.
    """
    weights_path, meta = read_meta(path_or_dir)
    kwargs = dict(meta.get("factory_kwargs", {}), **override_kwargs)
    try:
        model = timm.create_model(meta["model_name"], pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError) as err:
        raise BackboneLoadError(f"{weights_path.parent / META_NAME}: cannot build {meta['model_name']} "
                                f"with {kwargs}: {err}") from err
    state = load_file(str(weights_path))
    if isinstance(model, (HybridViT, ResViT)):
        state = checkpoint_filter_fn(state, model)  # resamples pos_embed when img_size was overridden
    _load_strict(model, state, weights_path)
    return model.eval()


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], weights_path: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", mismatched)) if keys]
        raise BackboneLoadError(f"{weights_path}: weights do not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
