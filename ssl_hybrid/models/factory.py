"""One way to build a backbone from a timm name, for the trainer and the evaluators alike."""

from __future__ import annotations

from typing import Any, Optional

import timm
from torch import nn


def create_model(name: str, image_size: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, img_size=image_size, **kwargs)``.

    Never downloads weights. ``img_size`` is passed only to models that take it (ViTs, ``hybrid_*``):
    convolutional networks accept any input size and have no such argument. The model keeps the
    kwargs it was built with as ``model.factory_kwargs`` (what an export records to rebuild it; our
    ``hybrid_*``/``resvit_*`` factories set it themselves).
    """
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
    if image_size is not None:
        try:
            return _recorded(timm.create_model(name, pretrained=False, img_size=image_size, **kwargs),
                             dict(kwargs, img_size=image_size))
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return _recorded(timm.create_model(name, pretrained=False, **kwargs), kwargs)


def _recorded(model: nn.Module, kwargs: dict[str, Any]) -> nn.Module:
    if getattr(model, "factory_kwargs", None) is None:
        model.factory_kwargs = kwargs
    return model


def create_backbone(name: str, image_size: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """``create_model`` without a classifier (``num_classes=0``) unless ``kwargs`` asks for one."""
    return create_model(name, image_size, **{"num_classes": 0, **kwargs})
