"""One way to build a backbone from a timm name, for the trainer and the evaluators alike, and the one check
for a name and factory kwargs read from a file (:func:`check_factory_args`): files are data, never code."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Mapping
from typing import Any

import timm
import torch
from timm.models import build_model_with_cfg
from torch import nn

from ssl_hybrid.errors import UserError


def create_model(name: str, image_size: int | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, img_size=image_size, **kwargs)``.

    Never downloads weights. ``img_size`` is passed only to models that take it (ViTs, ``hybrid_*``):
    convolutional networks accept any input size and have no such argument. The model keeps the
    kwargs it was built with as ``model.factory_kwargs`` (what an export records to rebuild it; our
    ``hybrid_*``/``resvit_*`` factories set it themselves).
    """
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
    if image_size is not None:
        try:
            return _recorded(
                timm.create_model(name, pretrained=False, img_size=image_size, **kwargs),
                dict(kwargs, img_size=image_size),
            )
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return _recorded(timm.create_model(name, pretrained=False, **kwargs), kwargs)


def _recorded(model: nn.Module, kwargs: dict[str, Any]) -> nn.Module:
    if getattr(model, "factory_kwargs", None) is None:
        # torch's stubs type nn.Module.__setattr__'s value as Tensor | Module; a plain attribute is fine at run time
        model.factory_kwargs = kwargs  # type: ignore[assignment]
    return model


def create_backbone(name: str, image_size: int | None = None, **kwargs: Any) -> nn.Module:
    """``create_model`` without a classifier (``num_classes=0``) unless ``kwargs`` asks for one."""
    return create_model(name, image_size, **{"num_classes": 0, **kwargs})


# ------------------------------------------------------------------------------- models named by files


class ModelArgsError(UserError):
    """A model name or factory argument read from a file that this tool does not build from a file."""


# A timm name in its plain form, with an optional pretrained tag ('vit_small_patch16_224.augreg_in21k'): no
# 'hf-hub:'/'local-dir:' source and no 'timm/' hub path, which make timm fetch a config (and weights) elsewhere.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")
# Never accepted from a file, even if a model class took them: what timm's factory and builder consume
# themselves (checkpoint_path makes timm torch.load a file; pretrained_cfg* point it at other weights).
_LOADER_ARGS = frozenset(inspect.signature(timm.create_model).parameters) | frozenset(
    inspect.signature(build_model_with_cfg).parameters
)


@functools.cache
def factory_arguments(name: str) -> frozenset[str]:
    """The constructor arguments of the model class ``name`` builds: what a model family defines.

    Read from the class's signature (the class is found by building the default model on the meta device,
    which allocates nothing), so every registered family, ours and timm's, has its exact list. Our
    ``hybrid_*``/``resvit_*`` constructors compute their drop-path rates on the CPU for that reason.
    """
    try:
        with torch.device("meta"):
            model_class = type(timm.create_model(name, pretrained=False))
    except Exception:  # a constructor that reads tensor values cannot run on meta: build it for real, once
        model_class = type(timm.create_model(name, pretrained=False))
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in inspect.signature(model_class).parameters.values() if p.kind in named)


def check_factory_args(name: Any, kwargs: Mapping[str, Any], source: str) -> None:
    """Refuse what a file (``backbone.json``, a checkpoint's ``config.yaml``, a model folder's ``config.json``)
    may not make timm do: build a model that is not a registered plain name, or take an argument that is not
    one of its class's own (``checkpoint_path``, ``pretrained_cfg*``, ``cache_dir``... read other files).
    ``img_size`` and ``pretrained`` are handled by :func:`create_model` and always allowed."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or not timm.is_model(name):
        raise ModelArgsError(
            f"{source}: model name {name!r} is not a registered timm model name (a file may not "
            "name a source such as hf-hub:, local-dir: or timm/)"
        )
    given = set(kwargs) - {"img_size", "pretrained"}
    refused = sorted(given & _LOADER_ARGS) or sorted(given - factory_arguments(name))
    if refused:
        raise ModelArgsError(
            f"{source}: factory argument{'s' if len(refused) > 1 else ''} {', '.join(refused)} "
            f"not accepted for {name} (a file may only set the model class's own arguments)"
        )


def create_model_from_file_args(name: str, image_size: int | None, kwargs: Mapping[str, Any], source: str) -> nn.Module:
    """:func:`create_model` for a name and kwargs read from ``source`` (a file): checked first."""
    check_factory_args(name, kwargs, source)
    return create_model(name, image_size, **kwargs)
