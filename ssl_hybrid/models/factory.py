"""One way to build a backbone from a timm name, for the trainer and the evaluators alike."""

from __future__ import annotations

from typing import Any, Optional

import timm
from torch import nn


def create_backbone(name: str, image_size: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size, **kwargs)``.

    Never downloads weights. ``img_size`` is passed only to models that take it (ViTs, ``hybrid_*``):
    convolutional networks accept any input size and have no such argument.
    """
    kwargs = {"num_classes": 0, **kwargs, "pretrained": False}
    if image_size is None:
        return timm.create_model(name, **kwargs)
    try:
        return timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        return timm.create_model(name, **kwargs)
