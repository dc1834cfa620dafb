"""One training step: forward, named loss terms, the weighted sum, backward, optimiser step."""
from __future__ import annotations

import torch
from torch import nn

from megaclip.config import ObjectiveConfig
from megaclip.losses import build_contrastive_loss


class Objective(nn.Module):
    """The configured loss modules and the one place where their terms are weighted."""

    def __init__(self, cfg: ObjectiveConfig):
        super().__init__()
        self.contrastive = build_contrastive_loss(cfg)
        self.weights = {cfg.contrastive: cfg.contrastive_weight}

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.contrastive(**outputs)

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[k] * v for k, v in terms.items())


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {"images": batch["images"].to(device, dtype, non_blocking=True),
            "tokens": batch["tokens"].to(device, non_blocking=True),
            "eot": batch["eot"].to(device, non_blocking=True)}


def train_step(engine, objective: Objective, batch: dict) -> dict[str, torch.Tensor]:
    """One micro-batch through the DeepSpeed engine; the engine decides when the optimiser steps
    (gradient accumulation boundaries). Returns detached terms for logging."""
    outputs = engine(**batch)
    terms = objective(outputs)
    loss = objective.total(terms)
    engine.backward(loss)
    engine.step()
    logged = {k: v.detach() for k, v in terms.items()}
    logged["loss"] = loss.detach()
    logged["logit_scale"] = outputs["logit_scale"].detach()
    return logged
