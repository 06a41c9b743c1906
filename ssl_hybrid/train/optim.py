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


def param_groups(model: nn.Module) -> list[dict]:
    """[decay group, no-decay group] over trainable parameters; the loop sets lr/wd per step."""
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name in skip else decay).append(param)
    log.debug("weight decay on %d tensors, none on %d", len(decay), len(no_decay))
    return [{"params": decay, "weight_decay": 0.0, "apply_wd": True},
            {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


def build_optimizer(model: nn.Module, betas: tuple[float, float]) -> torch.optim.AdamW:
    # lr and weight decay are placeholders: the loop writes the step's scheduled values before each step.
    return torch.optim.AdamW(param_groups(model), lr=0.0, betas=betas)


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay if group.get("apply_wd", True) else 0.0
