"""SimCLR: lightly's projection head and NT-Xent loss with negatives gathered from every process.

``NTXentLoss(gather_distributed=True)`` all-gathers the embeddings with a gather that carries
gradients back to their process, so N processes with B images each compute the same loss and
gradients as one process with N*B images (tested with 2 gloo processes in tests/train).
"""

from __future__ import annotations

from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor, nn


class ContrastiveObjective(nn.Module):
    """Projection head + NT-Xent on two views. ``forward`` returns ``{"simclr": loss}``."""

    def __init__(self, embed_dim: int, out_dim: int, temperature: float, hidden_dim: int = 2048,
                 batch_norm: bool = True) -> None:
        super().__init__()
        self.head = SimCLRProjectionHead(embed_dim, hidden_dim, out_dim, batch_norm=batch_norm)
        self.loss = NTXentLoss(temperature=temperature, gather_distributed=True)

    def project(self, embedding: Tensor) -> Tensor:
        """[B, C] backbone embedding -> [B, out_dim] projection (fp32 for the loss)."""
        return self.head(embedding).float()

    def forward(self, embeddings: list[Tensor]) -> dict[str, Tensor]:
        """embeddings: [B, C] backbone embeddings of exactly two views of the same images."""
        if len(embeddings) != 2:
            raise ValueError(f"SimCLR needs exactly 2 views, got {len(embeddings)}")
        z0, z1 = (self.project(e) for e in embeddings)
        return {"simclr": self.loss(z0, z1)}
