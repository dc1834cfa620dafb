"""Distillation head: MLP -> L2-normalised bottleneck -> cosine logits over K prototypes.

The prototypes' rows are normalised inside ``forward`` (DINO's weight-normalised last layer
with its gain fixed at 1); a ``torch.nn.utils.weight_norm`` parametrisation would not survive
ZeRO-3 partitioning.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PrototypeHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int, bottleneck: int, prototypes: int, layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mlp: list[nn.Module] = []
        for i in range(len(dims) - 1):
            mlp.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                mlp.append(nn.GELU())
        self.mlp = nn.Sequential(*mlp)
        self.prototypes = nn.Linear(bottleneck, prototypes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.prototypes.weight, dim=-1))
