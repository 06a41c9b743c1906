"""The parts of timm's model contract that both backbone families (``hybrid_*``, ``resvit_*``) implement alike:
classifier access and reset, grad checkpointing, the patch grid of an input and its position embedding."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function, resample_abs_pos_embed
from torch import nn
from torch.utils.checkpoint import checkpoint

PATCH_SIZE = 16
# "multiscale": every stage's average + class token + patch mean, each L2-normalized, concatenated (what the
# evaluators score by default); the exported model folder sets it so that timm's model(x) gives that embedding.
GLOBAL_POOLS = ("token_avg", "token", "avg", "", "multiscale")
# Evaluation resize + center crop share (224 from 256, the standard ImageNet crop): our models' pretrained_cfg
# crop_pct and the evaluators' transform both read it, so what timm reports is what the numbers were made with.
EVAL_CROP_PCT = 0.875
# FX: calls from this module's methods to timm's resampler (whose size early-out is control flow) become leaves
torch.fx.wrap("resample_abs_pos_embed")


@torch.fx.wrap
@register_notrace_function  # reason: checks the input size (FX would see a Proxy in the control flow)
def token_grid(x: torch.Tensor) -> tuple[int, int]:
    """``(H/16, W/16)`` of an image batch ``[B, C, H, W]``; ValueError unless H and W are multiples of 16."""
    H, W = x.shape[-2:]
    if H % PATCH_SIZE or W % PATCH_SIZE:
        raise ValueError(f"input size {H}x{W} must be a multiple of {PATCH_SIZE}")
    return H // PATCH_SIZE, W // PATCH_SIZE


class TimmModel(Protocol):
    """The part of timm's model contract that the objectives and evaluators call, for the type checker: timm types
    its models as ``nn.Module``, whose ``__getattr__`` types any other attribute as ``Tensor | Module``. Apply it
    with ``typing.cast`` to a model that implements the contract (every timm model does)."""

    num_features: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...

    def forward_intermediates(
        self, x: torch.Tensor, indices: list[int], intermediates_only: bool
    ) -> list[torch.Tensor]: ...

    def no_weight_decay(self) -> set[str]: ...

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None: ...

    def get_classifier(self) -> nn.Module: ...


class TokenBackbone(TimmModel, Protocol):
    """What our backbones (``hybrid_*``, ``resvit_*``) add to timm's contract (see ``TimmModel``)."""

    num_multiscale_features: int
    global_pool: str  # "multiscale" among the choices

    def forward_multiscale(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]: ...


def check_global_pool(global_pool: str) -> str:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
    return global_pool


def multiscale_pool(stage_means: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """``[B, sum C_i + 2D]``: each stage's global average, the class token and the patch mean of ``tokens
    [B, 1+N, D]``, each L2-normalized (so no scale dominates by its magnitude), concatenated."""
    parts = [*stage_means, tokens[:, 0], tokens[:, 1:].mean(dim=1)]
    return torch.cat([F.normalize(p, dim=-1) for p in parts], dim=-1)


class TokenBackboneMixin:
    """For backbones with ``embed_dim``, ``head``, ``pos_embed`` over ``patch_grid``, a class token,
    ``num_multiscale_features`` and ``grad_checkpointing``; see ``HybridViT`` / ``ResViT``.

    ``global_pool="multiscale"`` pools with ``multiscale_pool`` over the stage averages that the last
    ``forward_features`` kept (``last_stage_means``): ``forward_head(forward_features(x), pre_logits=True)``
    and ``forward(x)`` then equal ``forward_multiscale(x)``.
    """

    last_stage_means: list[torch.Tensor] | None = None
    # Set by the backbone's __init__ (and the timm factory); declared so that they type as what they are, not as
    # nn.Module.__getattr__'s Tensor | Module. Annotations only: no class attribute is created.
    num_classes: int
    global_pool: str
    embed_dim: int
    num_multiscale_features: int
    patch_grid: tuple[int, int]
    pos_embed: torch.Tensor
    grad_checkpointing: bool
    head: nn.Module
    model_name: str
    factory_kwargs: dict[str, Any]

    @property
    def head_hidden_size(self) -> int:
        """Width of ``forward_head(..., pre_logits=True)`` (timm's name): the classifier's input."""
        return self.num_multiscale_features if self.global_pool == "multiscale" else self.embed_dim

    def _keep_stage_means(self, maps: list[torch.Tensor], channels_last: bool = False) -> None:
        """Remember each stage map's global average when pooling needs it (``multiscale``), else nothing."""
        if self.global_pool != "multiscale" or isinstance(maps[0], torch.fx.Proxy):
            self.last_stage_means = None
            return
        self.last_stage_means = [m.mean(dim=(1, 2) if channels_last else (2, 3)) for m in maps]

    def _multiscale_head_input(self, x: torch.Tensor) -> torch.Tensor:
        means = self.last_stage_means
        if means is None or means[0].shape[0] != x.shape[0]:
            raise ValueError(
                "global_pool='multiscale' pools the stage maps of the same forward_features call: "
                "call forward_head(forward_features(images)) or model(images)"
            )
        return multiscale_pool(means, x)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool)
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def _run(self, module: nn.Module, *args):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _grid_of(self, x: torch.Tensor) -> tuple[int, int]:
        return token_grid(x)

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """``[1, N, D]`` position embedding, bicubically resampled when the grid is not the default (timm's
        resampler returns it unchanged otherwise, and is a leaf for FX tracing)."""
        if torch.jit.is_tracing():  # the ONNX exporter: timm's same-size early-out would freeze the example's grid
            return resample_traced(self.pos_embed, grid, self.patch_grid)
        return resample_abs_pos_embed(self.pos_embed, new_size=grid, old_size=self.patch_grid, num_prefix_tokens=0)


def resample_traced(pos_embed: torch.Tensor, grid, old_grid: tuple[int, int]) -> torch.Tensor:
    """timm's ``resample_abs_pos_embed`` (bicubic, antialiased, no prefix tokens) without its size check, so a
    traced graph resamples to whatever grid its input has (at the same grid the resampling is the identity)."""
    dim = pos_embed.shape[-1]
    maps = pos_embed.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # [1, D, h, w]
    maps = F.interpolate(maps, size=grid, mode="bicubic", antialias=True)  # [1, D, H/16, W/16]
    return maps.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)  # [1, N, D]
