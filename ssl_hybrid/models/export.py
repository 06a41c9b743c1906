"""The one exported-backbone format: ``backbone.safetensors`` + ``backbone.json``, its writer and its reader.

The JSON holds what is needed to rebuild the module without our code's defaults drifting:
the timm model name, the factory kwargs it was created with, ``img_size`` and ``num_features``,
plus whatever the caller adds (e.g. the ``image_size`` it was pretrained at, the run's step).
``save_backbone`` writes it (the trainer's checkpoints write the same JSON through ``make_meta`` +
``write_meta``); ``load_backbone`` reads it back and loads the weights strictly. The weights also load
through timm alone::

    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=".../backbone.safetensors"),
                      **meta["factory_kwargs"])

Older run directories named the model ``model`` and its kwargs ``kwargs`` (the trainer's checkpoints did,
and hand-written files followed them); ``read_meta`` still reads those (``upgrade_meta``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ssl_hybrid.errors import UserError
from ssl_hybrid.models.factory import ModelArgsError, check_factory_args, create_model_from_file_args

log = logging.getLogger(__name__)

WEIGHTS_NAME = "backbone.safetensors"
META_NAME = "backbone.json"
FORMAT_VERSION = 1
# A trainer checkpoint's weights (next to a backbone.json) hold the student backbone under this prefix.
CHECKPOINT_WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_BACKBONE_PREFIX = "backbone."


class BackboneLoadError(UserError):
    """A saved backbone is missing, malformed, or does not match the architecture it names."""


# ------------------------------------------------------------------------------------------- writing

def _model_name(model: nn.Module) -> str:
    name = getattr(model, "model_name", None) or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not name:
        raise ValueError("cannot tell which timm model this is (no model_name / pretrained_cfg['architecture'])")
    return name


def _factory_kwargs(model: nn.Module) -> dict[str, Any]:
    kwargs = getattr(model, "factory_kwargs", None)
    if kwargs is None:  # built outside models.factory: the class count is the one argument we can recover
        kwargs = {"num_classes": getattr(model, "num_classes", 0)}
    return json.loads(json.dumps(kwargs, default=list))  # tuples -> lists, fail early on non-JSON values


def make_meta(model: nn.Module, extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``backbone.json`` content for ``model``: how to rebuild it, plus ``extra_meta``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    img_size = getattr(model, "img_size", None) or cfg.get("input_size", [0, 0, 0])[-2:]
    return dict(format_version=FORMAT_VERSION, model_name=_model_name(model), factory_kwargs=_factory_kwargs(model),
                img_size=list(img_size), num_features=int(getattr(model, "num_features", 0)), **(extra_meta or {}))


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def save_backbone(model: nn.Module, directory: Union[str, os.PathLike], extra_meta: dict[str, Any] | None = None
                  ) -> tuple[Path, Path]:
    """Write ``backbone.safetensors`` and ``backbone.json`` into ``directory``; returns both paths.

    Files are written under temporary names and renamed, so a crash never leaves a half-written pair.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_path, meta_path = directory / WEIGHTS_NAME, directory / META_NAME
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = make_meta(model, extra_meta)
    tmp_weights, tmp_meta = weights_path.with_suffix(".safetensors.tmp"), meta_path.with_suffix(".json.tmp")
    save_file(state, str(tmp_weights), metadata={"model_name": meta["model_name"]})
    write_meta(tmp_meta, meta)
    os.replace(tmp_weights, weights_path)
    os.replace(tmp_meta, meta_path)
    return weights_path, meta_path


# ------------------------------------------------------------------------------------------- reading

def upgrade_meta(meta: dict[str, Any], where: Union[str, os.PathLike]) -> dict[str, Any]:
    """``meta`` in the current layout; raises when no model is named, or when the name or the factory kwargs
    are not what a file may set (:func:`ssl_hybrid.models.factory.check_factory_args`).

    The old layout (the trainer's checkpoints before this format, and files written by hand after them)
    is ``{"model": name, "image_size": px, "kwargs": {...}}``, meaning ``create_backbone(name, px, **kwargs)``:
    built at that size, without a classifier.
    """
    meta = dict(meta)
    if "model_name" not in meta and "model" in meta:
        size = {"img_size": meta["image_size"]} if meta.get("image_size") else {}
        meta["model_name"] = meta.pop("model")
        meta["factory_kwargs"] = {"num_classes": 0, **size, **(meta.pop("kwargs", None) or {})}
    if not meta.get("model_name"):
        raise BackboneLoadError(f"{where}: no 'model_name' key naming the timm model; "
                                "write one with {\"model_name\": \"<timm name>\", \"image_size\": <px>}")
    meta["factory_kwargs"] = dict(meta.get("factory_kwargs") or {})
    try:
        check_factory_args(meta["model_name"], meta["factory_kwargs"], str(where))  # a file is data, never code
    except ModelArgsError as err:
        raise BackboneLoadError(str(err)) from None
    return meta


def read_meta_file(meta_path: Union[str, os.PathLike]) -> dict[str, Any]:
    """One ``backbone.json``, old key names upgraded."""
    meta_path = Path(meta_path)
    if not meta_path.is_file():
        raise BackboneLoadError(f"{meta_path}: not found (a saved backbone is {WEIGHTS_NAME} + {META_NAME})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BackboneLoadError(f"{meta_path}: malformed JSON ({err.msg} at line {err.lineno})") from None
    except RecursionError:  # json's decoder recurses per nesting level
        raise BackboneLoadError(f"{meta_path}: JSON nested too deeply to be a backbone description") from None
    if not isinstance(meta, dict):
        raise BackboneLoadError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    return upgrade_meta(meta, meta_path)


def read_meta(path_or_dir: Union[str, os.PathLike]) -> tuple[Path, dict[str, Any]]:
    """Resolve ``(weights_path, meta)`` from a directory, the .safetensors or the .json path."""
    path = Path(path_or_dir)
    if not path.exists():
        raise BackboneLoadError(f"{path}: not found (expected a directory with {WEIGHTS_NAME} + {META_NAME})")
    if path.is_file() and path.suffix not in (".safetensors", ".json"):
        raise BackboneLoadError(f"{path}: weights must be a .safetensors file (pickled checkpoints are not loaded)")
    directory = path if path.is_dir() else path.parent
    weights_path = path if path.suffix == ".safetensors" else directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise BackboneLoadError(f"{weights_path}: not found (a saved backbone is {WEIGHTS_NAME} + {META_NAME})")
    return weights_path, read_meta_file(directory / META_NAME)


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], where: Union[str, os.PathLike], *,
                      ignore_unexpected: bool = False, error: type[UserError] = BackboneLoadError) -> list[str]:
    """Load ``state`` into ``model``: every key present, every shape equal, else ``error`` naming the keys.

    ``ignore_unexpected``: keys the model does not have (e.g. a head saved alongside) are logged and
    skipped instead of refused. Returns the unexpected keys.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    problems = (("missing keys", missing), ("unexpected keys", [] if ignore_unexpected else unexpected),
                ("shape mismatches", mismatched))
    if any(keys for _, keys in problems):
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for label, keys in problems if keys]
        raise error(f"{where}: weights do not fit {type(model).__name__}: " + "; ".join(parts))
    if unexpected:
        log.warning("%s: %d unexpected keys ignored (e.g. %s)", where, len(unexpected), ", ".join(unexpected[:3]))
    model.load_state_dict({k: state[k] for k in own}, strict=True)
    return unexpected


def _read_weights(weights_path: Path, prefix: str) -> dict[str, torch.Tensor]:
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise BackboneLoadError(f"{weights_path}: unreadable safetensors file ({err})") from None
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def rebuild(weights_path: Path, meta: dict[str, Any], *, prefix: str = "", ignore_unexpected: bool = False,
            **override_kwargs: Any) -> tuple[nn.Module, list[str]]:
    """Build ``meta``'s model (its factory kwargs, ``override_kwargs`` on top) and load the weights strictly.

    ``prefix``: use only the weights under it (``CHECKPOINT_BACKBONE_PREFIX`` for a trainer checkpoint).
    The model's timm module adapts the weights first when it has a ``checkpoint_filter_fn`` (ViTs, our
    hybrids: the position embedding is resampled when ``img_size`` changes). Returns the model in eval
    mode and the unexpected keys (see ``load_state_strict``).
    """
    kwargs = {k: v for k, v in {**meta["factory_kwargs"], **override_kwargs}.items() if k != "pretrained"}
    image_size = kwargs.pop("img_size", None)
    try:
        model = create_model_from_file_args(meta["model_name"], image_size, kwargs, str(weights_path))
    except (RuntimeError, TypeError, ValueError) as err:
        raise BackboneLoadError(f"{weights_path}: cannot build {meta['model_name']} with "
                                f"{dict(kwargs, img_size=image_size)}: {err}") from err
    state = _read_weights(weights_path, prefix)
    adapt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if adapt is not None:
        state = adapt(state, model)
    unexpected = load_state_strict(model, state, weights_path, ignore_unexpected=ignore_unexpected)
    return model.eval(), unexpected


def load_backbone(path_or_dir: Union[str, os.PathLike], **override_kwargs: Any) -> nn.Module:
    """Rebuild the saved model (``timm.create_model(name, **factory_kwargs)``) and load weights strictly.

    ``override_kwargs`` replace saved factory kwargs (e.g. ``num_classes=0``, ``img_size=96``; the
    position embedding is resampled when ``img_size`` changes). The model is returned in eval mode.
    Raises BackboneLoadError naming the missing/unexpected/mismatched keys when the weights do not
    fit the architecture.
    """
    weights_path, meta = read_meta(path_or_dir)
    return rebuild(weights_path, meta, **override_kwargs)[0]
