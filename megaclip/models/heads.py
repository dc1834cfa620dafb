"""Distillation head: MLP -> L2-normalised bottleneck -> cosine logits over K prototypes.

The prototypes' rows are normalised inside their own module's ``forward`` (DINO's
weight-normalised last layer with its gain fixed at 1), so ZeRO-3 gathers the weight where it is
read, like any other parameter; a ``torch.nn.utils.weight_norm`` parametrisation would not
survive ZeRO-3 partitioning. The cosine logits are computed in fp32: divided by a teacher
temperature of 0.04, bf16's rounding of a cosine would be about 0.1 logit of noise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CosinePrototypes(nn.Module):
    """K prototype rows; ``frozen``: the logits do not move them (DINO and iBOT freeze the last
    layer for the first steps). Their scale never matters (rows are normalised), so weight decay
    on a frozen layer changes nothing."""

    def __init__(self, dim: int, prototypes: int):
        super().__init__()
        # As nn.Linear (models.build.init_weights draws it again, as it draws a linear layer).
        weight = torch.empty(prototypes, dim)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.weight = nn.Parameter(weight)
        self.frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.detach() if self.frozen else self.weight
        return F.linear(x.float(), F.normalize(weight.float(), dim=-1))


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
        self.prototypes = CosinePrototypes(bottleneck, prototypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine logits (..., K), fp32."""
        return self.prototypes(F.normalize(self.mlp(x), dim=-1))
