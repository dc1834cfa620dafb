"""Masked language modelling loss on the caption: cross-entropy at the chosen positions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaclip.distributed import all_reduce_sum, world


class MlmLoss(nn.Module):
    """Terms ``{"mlm"}``: cross-entropy of the decoder's logits (one row per chosen piece,
    row-major order of ``target``) against the original pieces, averaged over every piece of
    the global batch.

    Captions differ in length, so ranks mask different numbers of pieces; a per-rank mean would
    weight a piece by its rank's count. Each rank's mean is scaled by its count times the world
    size over the global count (one small all-reduce; 1 when the counts agree), so the mean
    over ranks that data parallelism takes, of values and of gradients, is the global
    per-piece mean."""

    def forward(self, mlm_logits: torch.Tensor, tokens: torch.Tensor,
                target: torch.Tensor) -> dict[str, torch.Tensor]:
        count = all_reduce_sum(torch.tensor([float(mlm_logits.shape[0])],
                                            device=mlm_logits.device))
        if mlm_logits.shape[0] == 0:  # no piece to mask here: a zero that keeps the graph
            return {"mlm": mlm_logits.float().sum()}
        mean = F.cross_entropy(mlm_logits.float(), tokens[target])
        return {"mlm": mean * (mlm_logits.shape[0] * world()[1] / count[0].clamp_min(1.0))}
