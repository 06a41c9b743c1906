"""SimCLR: lightly's projection head and NT-Xent loss with negatives gathered from every process.

Multi-crop (SwAV's "SimCLR + multi-crop"): with local crops next to the two global views, the loss is the mean
NT-Xent over the global pair and every (global, local) pair, so each small crop of a part is pulled towards
both views of the whole image; local crops are not paired with each other (as in DINO). With two views it is
lightly's NT-Xent unchanged.

``NTXentLoss(gather_distributed=True)`` all-gathers the embeddings with a gather that carries
gradients back to their process, so N processes with B images each compute the same loss and
gradients as one process with N*B images (tested with 2 gloo processes in tests/train).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor, nn


class ContrastiveObjective(nn.Module):
    """Projection head + NT-Xent on two global views (+ local crops). ``forward`` returns ``{"simclr": loss}``."""

    def __init__(
        self, embed_dim: int, out_dim: int, temperature: float, hidden_dim: int = 2048, batch_norm: bool = True
    ) -> None:
        super().__init__()
        self.head = SimCLRProjectionHead(embed_dim, hidden_dim, out_dim, batch_norm=batch_norm)
        self.loss = NTXentLoss(temperature=temperature, gather_distributed=True)

    def project(self, embedding: Tensor) -> Tensor:
        """[B, C] backbone embedding -> [B, out_dim] projection (fp32 for the loss)."""
        return self.head(embedding).float()

    def forward(self, embeddings: list[Tensor], local_embeddings: Sequence[Tensor] = ()) -> dict[str, Tensor]:
        """embeddings: [B, C] backbone embeddings of exactly two global views of the same images;
        local_embeddings: [B, C] each, of the local crops (multi-crop), paired with both global views."""
        if len(embeddings) != 2:
            raise ValueError(f"SimCLR needs exactly 2 global views, got {len(embeddings)}")
        g0, g1 = (self.project(e) for e in embeddings)
        terms = [self.loss(g0, g1)]
        for local in local_embeddings:
            z = self.project(local)
            terms += [self.loss(g0, z), self.loss(g1, z)]
        return {"simclr": torch.stack(terms).mean()}
