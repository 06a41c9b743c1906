"""The pretraining model: one backbone, the objectives the recipe weights, their weighted sum.

Joint (the default recipe, iBOT/CMAE-like): when MIM is on, the student sees *masked* global views
(its transformer runs on visible tokens only, the cheap path), and the same forward feeds both the
MIM decoder and the DINO head, distilled against the EMA teacher's *full* global views. Local crops
(multi-crop) go through the student unmasked. An objective whose weight is 0 is not built, so it
costs nothing and leaves no parameter without a gradient.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_hybrid.config import Config, ObjectiveConfig
from ssl_hybrid.models.contract import TimmModel, TokenBackbone
from ssl_hybrid.models.pooling import multiscale_dim, multiscale_embed, offers_multiscale
from ssl_hybrid.objectives.contrastive import ContrastiveObjective
from ssl_hybrid.objectives.distill import DINOObjective, EMATeacher
from ssl_hybrid.objectives.mim import MIMObjective

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectiveSettings:
    """What the objectives read: the ``objective`` config group as it is, plus the image size the MIM decoder
    reconstructs (a ``data`` key). Defaults live in :mod:`ssl_hybrid.config` only."""

    objective: ObjectiveConfig
    image_size: int

    @classmethod
    def from_config(cls, config: Config) -> ObjectiveSettings:
        return cls(config.objective, config.data.image_size)


def embedding_spread(embedding: Tensor) -> Tensor:
    """Std across the batch of L2-normalized embeddings, scaled so ~1 is healthy and 0 is collapse."""
    normed = F.normalize(embedding.detach().float(), dim=-1)  # [B, C]
    return normed.std(dim=0).mean() * math.sqrt(normed.shape[-1])


def embed(backbone: nn.Module, tokens: Tensor) -> Tensor:
    """Backbone tokens [B, 1+N, C] -> pooled embedding [B, C] (the backbone's own pooling)."""
    return cast(TimmModel, backbone).forward_head(tokens, pre_logits=True)


class PretrainModel(nn.Module):
    """Student backbone + heads of the enabled objectives (+ EMA teacher for DINO).

    ``forward(global_views, local_views, masks, teacher_temp)`` -> ``(losses, stats)`` where
    ``losses`` has one key per objective plus ``loss`` (the weighted sum, what is back-propagated).
    """

    def __init__(self, backbone: nn.Module, settings: ObjectiveSettings) -> None:
        super().__init__()
        self.settings = settings
        self.backbone = backbone
        s = settings.objective
        if s.embedding == "multiscale" and not offers_multiscale(backbone):
            raise ValueError(
                f"objective.embedding=multiscale needs a backbone with stage maps at several "
                f"strides (resvit_*, hybrid_*, timm CNNs), not {type(backbone).__name__}"
            )
        dim = multiscale_dim(backbone) if s.embedding == "multiscale" else cast(TimmModel, backbone).num_features
        self.mim = (
            MIMObjective(dim, settings.image_size, s.decoder_dim, s.decoder_depth, s.norm_pix_loss)
            if s.mim_weight > 0
            else None
        )
        self.dino = DINOObjective(dim, s.dino_out_dim, s.student_temp) if s.dino_weight > 0 else None
        self.simclr = ContrastiveObjective(dim, s.simclr_out_dim, s.simclr_temperature) if s.simclr_weight > 0 else None
        self.teacher = EMATeacher(backbone, self.dino.head) if self.dino is not None else None
        self.weights = {"mim": s.mim_weight, "dino": s.dino_weight, "simclr": s.simclr_weight}

    @property
    def uses_masks(self) -> bool:
        return self.mim is not None

    def view_embedding(self, view: Tensor) -> Tensor:
        """The student's unmasked embedding of one view [B, C] (objective.embedding picks the pooling)."""
        if self.settings.objective.embedding == "multiscale":  # every conv stage feeds the objective directly
            return multiscale_embed(self.backbone, view)
        return embed(self.backbone, cast(TimmModel, self.backbone).forward_features(view))

    def local_embeddings(self, local_views: list[Tensor]) -> list[Tensor]:
        """The local crops (multi-crop; all of one size) embedded in one forward, as DINO's MultiCropWrapper does:
        batch norm normalizes them as one batch and updates its running statistics once per step for them, not
        once per crop (4 small-crop updates against 2 global ones would skew the statistics evaluation uses).
        Computed once for every objective that uses them."""
        if not local_views:
            return []
        return list(self.view_embedding(torch.cat(local_views)).chunk(len(local_views)))

    def student_views(self, global_views: list[Tensor], masks: list[Tensor] | None):
        """Run the student on the global views: masked when MIM is on. Returns (embeddings, masked outputs)."""
        if not self.uses_masks:
            return [self.view_embedding(v) for v in global_views], []
        if masks is None or len(masks) != len(global_views):
            raise ValueError("MIM needs one mask per global view")
        backbone = cast(TokenBackbone, self.backbone)  # MIM is built for our backbones only
        outs = [backbone.forward_masked(v, m) for v, m in zip(global_views, masks)]
        # "fused" is the masked twin of forward_features (tokens + multi-scale fusion, normed), so the
        # student's masked embedding and the teacher's full-view embedding are the same function.
        return [embed(self.backbone, o["fused"]) for o in outs], outs

    def forward(
        self,
        global_views: list[Tensor],
        local_views: list[Tensor],
        masks: list[Tensor] | None = None,
        teacher_temp: float | None = None,
    ):
        """``masks``: one per global view when MIM is on; ``teacher_temp``: the step's scheduled DINO teacher
        temperature (objective.warmup_teacher_temp -> teacher_temp), needed when DINO is on."""
        if self.dino is not None and teacher_temp is None:
            raise ValueError("DINO needs the step's teacher temperature (teacher_temp)")
        embeddings, masked_outs = self.student_views(global_views, masks)
        losses: dict[str, Tensor] = {}
        if self.mim is not None:
            terms = [self.mim(o, v)["mim"] for o, v in zip(masked_outs, global_views)]
            losses["mim"] = torch.stack(terms).mean()
        stats = {"embedding_std": embedding_spread(embeddings[0])}
        local = self.local_embeddings(local_views) if self.dino is not None or self.simclr is not None else []
        if self.dino is not None and self.teacher is not None:  # the teacher comes with DINO
            teacher_logits = self.teacher(global_views)
            losses.update(self.dino(embeddings + local, teacher_logits, teacher_temp))
            stats["teacher_std"] = embedding_spread(teacher_logits[0])
        if self.simclr is not None:
            losses.update(self.simclr(embeddings[:2], local))
        # a Tensor: the config enables at least one objective, so the sum has a term
        losses["loss"] = cast(Tensor, sum(self.weights[name] * value.float() for name, value in losses.items()))
        return losses, stats

    @torch.no_grad()
    def after_good_step(self, momentum: float) -> None:
        """Called after the optimizer step: commit the DINO center, move the teacher towards the student."""
        if self.dino is not None and self.teacher is not None:  # the teacher comes with DINO
            self.dino.loss.commit_center()
            self.teacher.update(self.backbone, self.dino.head, momentum)

    def after_skipped_step(self) -> None:
        if self.dino is not None:
            self.dino.loss.discard_center()
