"""Multi-scale pooled embedding of a backbone: the global average of each stage map, L2-normalized, concatenated.

Our backbones (``resvit_*``, ``hybrid_*``) offer ``forward_multiscale`` (their stage maps plus the class token
and patch mean); a timm CNN (ResNet, ConvNeXt) gets the same treatment from ``forward_intermediates``, so the
evaluators' ``multiscale`` pooling and the ``objective.embedding=multiscale`` training embedding treat every
family alike.
"""

from __future__ import annotations

from typing import cast

import torch

from ssl_hybrid.models.contract import TimmModel, TokenBackbone


def _feature_info(backbone: torch.nn.Module) -> list[dict]:
    """timm's ``feature_info`` as a list of dicts (a ``FeatureInfo`` on features_only models, a list otherwise)."""
    info = getattr(backbone, "feature_info", None) or []
    return info.info if hasattr(info, "info") else list(info)


def pyramid_indices(backbone: torch.nn.Module) -> list[int]:
    """Indices into ``feature_info`` of the last map at each stride >= 4, for a timm CNN; [] when there is
    no pyramid (one stride only, like a ViT) or no ``forward_intermediates``."""
    info = _feature_info(backbone)
    if not info or not hasattr(backbone, "forward_intermediates"):
        return []
    last_at = {entry["reduction"]: index for index, entry in enumerate(info) if entry["reduction"] >= 4}
    return sorted(last_at.values()) if len(last_at) > 1 else []


def offers_multiscale(backbone: torch.nn.Module) -> bool:
    return hasattr(backbone, "forward_multiscale") or bool(pyramid_indices(backbone))


def multiscale_dim(backbone: torch.nn.Module) -> int:
    """Width of ``multiscale_embed``'s output."""
    if hasattr(backbone, "num_multiscale_features"):
        return cast(TokenBackbone, backbone).num_multiscale_features
    info = _feature_info(backbone)
    return sum(info[index]["num_chs"] for index in pyramid_indices(backbone))


def multiscale_embed(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Multi-scale pooled embedding ``[B, sum C_i]``: each stage's global average, L2-normalized, concatenated.

    Ours (``forward_multiscale``) adds the class token and the patch mean; a timm CNN (ResNet, ConvNeXt) gets
    the same treatment from its stage maps, so comparisons stay fair.
    """
    if hasattr(backbone, "forward_multiscale"):
        return cast(TokenBackbone, backbone).forward_multiscale(images)
    model = cast(TimmModel, backbone)
    maps = model.forward_intermediates(images, indices=pyramid_indices(backbone), intermediates_only=True)
    return torch.cat([torch.nn.functional.normalize(m.mean(dim=(2, 3)), dim=-1) for m in maps], dim=-1)
