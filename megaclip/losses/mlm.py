"""Masked language modelling loss on the caption: cross-entropy at the chosen positions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MlmLoss(nn.Module):
    """Terms ``{"mlm"}``: mean cross-entropy of the decoder's logits (one row per chosen piece,
    row-major order of ``target``) against the original pieces."""

    def forward(self, mlm_logits: torch.Tensor, tokens: torch.Tensor,
                target: torch.Tensor) -> dict[str, torch.Tensor]:
        if mlm_logits.shape[0] == 0:  # no caption had a piece to mask: a zero that keeps the graph
            return {"mlm": mlm_logits.float().sum()}
        return {"mlm": F.cross_entropy(mlm_logits.float(), tokens[target])}
