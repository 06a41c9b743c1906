"""AdamW parameter groups: weight decay on weights only, never on norms, biases or tokens; lr scales for the
transformer part (optim.transformer_lr_scale) and per backbone layer (optim.layer_decay)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ssl_hybrid.config import OptimConfig

log = logging.getLogger(__name__)

# Learned tokens and position tables: decaying them pulls positions/classes towards zero (timm, MAE, DINO).
NO_DECAY_NAME_PARTS = ("token", "pos_embed", "position", "rel_pos", "relative_position")


def no_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names excluded from weight decay."""
    backbone = getattr(model, "backbone", None)
    declared = set()
    if backbone is not None and hasattr(backbone, "no_weight_decay"):
        declared = {f"backbone.{name}" for name in backbone.no_weight_decay()}
    names = set()
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if (param.ndim <= 1 or name in declared or leaf in declared
                or any(part in leaf for part in NO_DECAY_NAME_PARTS)):
            names.add(name)
    return names


# Backbone parameters of the transformer part (ViT blocks, class token, position table): they get
# optim.transformer_lr_scale, since at small budgets they collapse at an lr the conv stages learn fast with.
TRANSFORMER_PREFIXES = ("backbone.blocks.", "backbone.cls_token", "backbone.pos_embed")


def is_transformer_parameter(name: str) -> bool:
    return name.startswith(TRANSFORMER_PREFIXES)


def layer_lr_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """Layer-wise lr decay (BEiT/MAE): lr multiplier per backbone parameter name. The backbone's
    ``group_matcher`` numbers its layers (timm's ``group_parameters``, as ``param_groups_layer_decay``);
    the heads sit one layer above the top, so layer i of L trains at lr * layer_decay ** (L - i) and the
    heads at the full lr (as ``eval.finetune``). {} when layer_decay is 1 (off)."""
    if layer_decay == 1.0:
        return {}
    from timm.models import group_parameters

    backbone = model.backbone
    layer_of = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
    above_top = max(layer_of.values()) + 1
    return {f"backbone.{name}": layer_decay ** (above_top - layer) for name, layer in layer_of.items()}


def param_groups(model: nn.Module, transformer_lr_scale: float, layer_decay: float) -> list[dict]:
    """Decay / no-decay groups over trainable parameters, split by lr scale (transformer part vs the rest,
    times the layer's decay); the loop sets lr (times the group's lr_scale) and wd per step."""
    skip = no_decay_names(model)
    layer_scale = layer_lr_scales(model, layer_decay)
    groups: dict[tuple[bool, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = (transformer_lr_scale if is_transformer_parameter(name) else 1.0) * layer_scale.get(name, 1.0)
        groups.setdefault((name not in skip, scale), []).append(param)
    log.debug("param groups (decay, lr scale): %s", {k: len(v) for k, v in groups.items()})
    return [{"params": params, "weight_decay": 0.0, "apply_wd": decay, "lr_scale": scale}
            for (decay, scale), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    # lr and weight decay are placeholders: the loop writes the step's scheduled values before each step.
    groups = param_groups(model, optim.transformer_lr_scale, optim.layer_decay)
    return torch.optim.AdamW(groups, lr=0.0, betas=(optim.beta1, optim.beta2))


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = weight_decay if group.get("apply_wd", True) else 0.0
