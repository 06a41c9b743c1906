"""A small deterministic encoder + the SimCLR objective (no batch norm, whose batch statistics are
per-process by design), shared by the 2-process script and the 1-process reference."""

import torch
from torch import nn

from ssl_hybrid.objectives.contrastive import ContrastiveObjective


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.GELU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16))
        self.simclr = ContrastiveObjective(16, out_dim=8, temperature=0.2, hidden_dim=32, batch_norm=False)

    def forward(self, view0, view1):
        return self.simclr([self.backbone(view0), self.backbone(view1)])["simclr"]


def build_model():
    torch.manual_seed(0)
    return Encoder().double()


def make_batch(total: int = 8):
    gen = torch.Generator().manual_seed(1)
    view0 = torch.randn(total, 3, 16, 16, generator=gen, dtype=torch.float64)
    view1 = view0 + 0.3 * torch.randn(total, 3, 16, 16, generator=gen, dtype=torch.float64)
    view0[total // 2:] *= 3.0  # the second rank's half is distributed differently
    view1[total // 2:] *= 3.0
    return view0, view1
