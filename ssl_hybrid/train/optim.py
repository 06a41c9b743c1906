"""AdamW parameter groups: weight decay on weights only, never on norms, biases or tokens."""

from __future__ import annotations

import logging

import torch
from torch import nn

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


def param_groups(model: nn.Module, transformer_lr_scale: float = 1.0) -> list[dict]:
    """Decay / no-decay groups over trainable parameters, split by lr scale (transformer part vs the rest
    when ``transformer_lr_scale != 1``); the loop sets lr (times the group's lr_scale) and wd per step."""
    skip = no_decay_names(model)
    groups: dict[tuple[bool, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = transformer_lr_scale if is_transformer_parameter(name) else 1.0
        groups.setdefault((name not in skip, scale), []).append(param)
    log.debug("param groups (decay, lr scale): %s", {k: len(v) for k, v in groups.items()})
    return [{"params": params, "weight_decay": 0.0, "apply_wd": decay, "lr_scale": scale}
            for (decay, scale), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]


def build_optimizer(model: nn.Module, betas: tuple[float, float],
                    transformer_lr_scale: float = 1.0) -> torch.optim.AdamW:
    # lr and weight decay are placeholders: the loop writes the step's scheduled values before each step.
    return torch.optim.AdamW(param_groups(model, transformer_lr_scale), lr=0.0, betas=betas)


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = weight_decay if group.get("apply_wd", True) else 0.0
