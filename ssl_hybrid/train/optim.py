"""AdamW parameter groups: weight decay on weights only, never on norms, biases or tokens; lr scales for the
transformer part (optim.transformer_lr_scale) and per backbone layer (optim.layer_decay).

timm decides both: ``param_groups_weight_decay`` which parameters decay (1-D ones and the names it is given
are exempt), ``param_groups_layer_decay`` each backbone layer's lr scale. This module only says which names
to exempt and re-buckets timm's answer by (decay, lr scale) together with the transformer scale."""

from __future__ import annotations

import logging
from typing import cast

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from ssl_hybrid.config import OptimConfig

log = logging.getLogger(__name__)

# Learned tokens and position tables: decaying them pulls positions/classes towards zero (timm, MAE, DINO).
# Matched in a parameter's own (last) name, so that the heads' mask tokens are exempt too.
NO_DECAY_NAME_PARTS = ("token", "pos_embed", "position", "rel_pos", "relative_position")


def no_weight_decay_list(model: nn.Module) -> list[str]:
    """What timm's grouping exempts besides 1-D parameters: the backbone's own ``no_weight_decay()`` and
    any parameter whose last name holds one of ``NO_DECAY_NAME_PARTS``."""
    backbone = getattr(model, "backbone", None)
    declared = (
        [f"backbone.{name}" for name in backbone.no_weight_decay()]
        if backbone is not None and hasattr(backbone, "no_weight_decay")
        else []
    )
    tokens = [
        name
        for name, _ in model.named_parameters()
        if any(part in name.rsplit(".", 1)[-1] for part in NO_DECAY_NAME_PARTS)
    ]
    return declared + tokens


def decays(model: nn.Module) -> dict[int, bool]:
    """id(parameter) -> whether it gets weight decay, for trainable parameters (timm's grouping)."""
    groups = param_groups_weight_decay(model, weight_decay=1.0, no_weight_decay_list=no_weight_decay_list(model))
    return {id(p): group["weight_decay"] > 0 for group in groups for p in group["params"]}


def no_decay_names(model: nn.Module) -> set[str]:
    """Full names of the trainable parameters excluded from weight decay."""
    decay = decays(model)
    return {name for name, p in model.named_parameters() if id(p) in decay and not decay[id(p)]}


# Backbone parameters of the transformer part (ViT blocks, class token, position table): they get
# optim.transformer_lr_scale, since at small budgets they collapse at an lr the conv stages learn fast with.
TRANSFORMER_PREFIXES = ("backbone.blocks.", "backbone.cls_token", "backbone.pos_embed")


def is_transformer_parameter(name: str) -> bool:
    return name.startswith(TRANSFORMER_PREFIXES)


def layer_lr_scales(model: nn.Module, layer_decay: float) -> dict[int, float]:
    """Layer-wise lr decay (BEiT/MAE): id(backbone parameter) -> lr multiplier. timm's
    ``param_groups_layer_decay`` numbers the backbone's layers by its ``group_matcher``; the heads sit one
    layer above the top (as ``eval.finetune``), so layer i of L trains at lr * layer_decay ** (L - i) and the
    heads at the full lr. {} when layer_decay is 1 (off)."""
    if layer_decay == 1.0:
        return {}
    backbone = cast(nn.Module, model.backbone)  # PretrainModel's (nn.Module types attributes Tensor | Module)
    groups = param_groups_layer_decay(backbone, layer_decay=layer_decay)
    return {id(p): group["lr_scale"] * layer_decay for group in groups for p in group["params"]}


def param_groups(model: nn.Module, transformer_lr_scale: float, layer_decay: float) -> list[dict]:
    """Decay / no-decay groups over trainable parameters, split by lr scale (transformer part vs the rest,
    times the layer's decay); the loop sets lr (times the group's lr_scale) and wd per step."""
    decay = decays(model)
    layer_scale = layer_lr_scales(model, layer_decay)
    groups: dict[tuple[bool, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = (transformer_lr_scale if is_transformer_parameter(name) else 1.0) * layer_scale.get(id(param), 1.0)
        groups.setdefault((decay[id(param)], scale), []).append(param)
    log.debug("param groups (decay, lr scale): %s", {k: len(v) for k, v in groups.items()})
    return [
        {"params": params, "weight_decay": 0.0, "apply_wd": apply_wd, "lr_scale": scale}
        for (apply_wd, scale), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
    ]


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    # lr and weight decay are placeholders: the loop writes the step's scheduled values before each step.
    groups = param_groups(model, optim.transformer_lr_scale, optim.layer_decay)
    return torch.optim.AdamW(groups, lr=0.0, betas=(optim.beta1, optim.beta2))


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = weight_decay if group.get("apply_wd", True) else 0.0
