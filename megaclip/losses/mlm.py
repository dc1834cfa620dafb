"""Masked language modelling loss on the caption: cross-entropy at the chosen positions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaclip.distributed import all_reduce_sum, world


class MlmLoss(nn.Module):
    """Terms ``{"mlm"}``: cross-entropy of the decoder's logits (B, K, vocab) at the positions
    ``index`` (B, K) against the original pieces, averaged over every chosen piece of the
    global batch (``valid`` (B, K) marks the chosen ones; the rest pad the rows to K).

    Captions differ in length, so ranks mask different numbers of pieces; a per-rank mean would
    weight a piece by its rank's count. Each rank's sum is scaled by the world size over the
    global count (one small all-reduce of a device value), so the mean over ranks that data
    parallelism takes, of values and of gradients, is the global per-piece mean. Every shape is
    fixed by the batch, and nothing is read back to the host."""

    def forward(self, mlm_logits: torch.Tensor, tokens: torch.Tensor, index: torch.Tensor,
                valid: torch.Tensor) -> dict[str, torch.Tensor]:
        target = tokens.gather(1, index).flatten()
        ce = F.cross_entropy(mlm_logits.float().flatten(0, 1), target, reduction="none")
        valid = valid.flatten()
        count = all_reduce_sum(valid.sum(dtype=torch.float32).reshape(1))
        total = torch.where(valid, ce, 0.0).sum()
        return {"mlm": total * (world()[1] / count[0].clamp_min(1.0))}
