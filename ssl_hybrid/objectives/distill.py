"""DINO self-distillation: lightly's projection head and loss, an EMA teacher, multi-crop.

The teacher is an exponential moving average of the student (``update_momentum``) whose momentum
follows a cosine schedule to 1.0, and whose softmax temperature warms up linearly (both arrays in
``train/schedules.py``, indexed by step). The teacher's centering buffer is averaged over every
process (the DINO reference all-reduces it; lightly's loss uses the local batch only) and committed
only after a step whose loss was finite, so a skipped step leaves no trace in it.
"""

from __future__ import annotations

import copy
import warnings
from typing import cast

import torch
import torch.distributed as dist
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from timm.layers import DropPath
from torch import Tensor, nn

from ssl_hybrid.models.contract import TimmModel


class DistributedDINOLoss(DINOLoss):
    """lightly's DINOLoss with the center averaged across processes and updated on ``commit_center``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pending_center: Tensor | None = None
        self._pending_count = 0

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        batch_center = teacher_out.float().mean(dim=(0, 1), keepdim=False).reshape(1, 1, -1)  # [1, 1, K]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(batch_center)
            batch_center /= dist.get_world_size()
        # Micro-batches of one accumulated step all count: keep a running mean until commit.
        if self._pending_center is None:
            self._pending_center, self._pending_count = batch_center, 1
        else:
            self._pending_count += 1
            self._pending_center += (batch_center - self._pending_center) / self._pending_count

    @torch.no_grad()
    def commit_center(self) -> None:
        """Apply the moving-average update computed in the last forward (call after a good step)."""
        if self._pending_center is not None:
            momentum = self.center_momentum
            self.center.mul_(momentum).add_(self._pending_center.to(self.center.dtype), alpha=1 - momentum)
            self._pending_center = None

    def discard_center(self) -> None:
        self._pending_center = None


def make_dino_head(
    embed_dim: int, out_dim: int, bottleneck_dim: int = 256, hidden_dim: int = 2048
) -> DINOProjectionHead:
    # Hidden 2048 / bottleneck 256 are DINO's; no batch norm with a transformer backbone (DINO's choice).
    with warnings.catch_warnings():  # lightly's head uses the old weight_norm API; nothing a user can change
        warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
        return DINOProjectionHead(
            embed_dim, hidden_dim, bottleneck_dim, out_dim, batch_norm=False, norm_last_layer=True
        )


class DINOObjective(nn.Module):
    """Student projection head + DINO loss. ``forward`` returns ``{"dino": loss}``.

    ``student_embeddings``: [B, C] per student view (global views first, then local crops);
    ``teacher_logits``: [B, K] per global view, already projected by the teacher head.
    """

    def __init__(self, embed_dim: int, out_dim: int, student_temp: float, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.head = make_dino_head(embed_dim, out_dim)
        self.loss = DistributedDINOLoss(output_dim=out_dim, student_temp=student_temp, center_momentum=center_momentum)

    def forward(
        self, student_embeddings: list[Tensor], teacher_logits: list[Tensor], teacher_temp: float
    ) -> dict[str, Tensor]:
        student_logits = [self.head(e).float() for e in student_embeddings]  # fp32 softmax in the loss
        teacher = [t.float() for t in teacher_logits]
        return {"dino": self.loss(teacher, student_logits, teacher_temp=teacher_temp)}


def disable_stochastic_layers(module: nn.Module) -> None:
    """The DINO teacher runs without drop-path/dropout but, like DINO's, keeps batch-norm in train mode."""
    for layer in module.modules():
        if isinstance(layer, DropPath):
            layer.drop_prob = 0.0
        elif isinstance(layer, nn.Dropout):
            layer.p = 0.0


class EMATeacher(nn.Module):
    """Frozen copy of the student backbone + DINO head, updated by exponential moving average."""

    def __init__(self, backbone: nn.Module, head: DINOProjectionHead) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        # A weight-normed layer cannot be deep-copied after a forward; build a twin and copy the weights.
        out_dim, bottleneck_dim = head.last_layer.weight_v.shape
        self.head = make_dino_head(
            head.layers[0].in_features, out_dim, bottleneck_dim, hidden_dim=head.layers[0].out_features
        )
        self.head.load_state_dict(head.state_dict())
        deactivate_requires_grad(self)
        disable_stochastic_layers(self)

    @torch.no_grad()
    def forward(self, views: list[Tensor]) -> list[Tensor]:
        """Full (unmasked) global views -> teacher logits [B, K] each."""
        out = []
        for view in views:
            backbone = cast(TimmModel, self.backbone)
            embedding = backbone.forward_head(backbone.forward_features(view), pre_logits=True)
            out.append(self.head(embedding))
        return out

    @torch.no_grad()
    def update(self, backbone: nn.Module, head: nn.Module, momentum: float) -> None:
        update_momentum(backbone, self.backbone, momentum)
        update_momentum(head, self.head, momentum)
