"""Contrastive objectives over the global batch. Each returns a dict of named loss terms."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaclip.config import ObjectiveConfig
from megaclip.distributed import gather_with_grad, world


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch.

    Every rank all-gathers both feature sets with gradient. With ``local_loss`` a rank scores
    only its own rows against all columns (memory O(local x global)); the mean of the ranks'
    losses is then exactly the single-process loss on the global batch, and so are the gradients
    once the data-parallel engine averages them.
    """

    def __init__(self, local_loss: bool = True):
        super().__init__()
        self.local_loss = local_loss

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, **_: torch.Tensor) -> dict[str, torch.Tensor]:
        img, txt = image_features.float(), text_features.float()
        rank, _ = world()
        all_img, all_txt = gather_with_grad(img), gather_with_grad(txt)
        n = img.shape[0]
        if self.local_loss:
            logits_i2t = logit_scale * img @ all_txt.T  # (n, N)
            logits_t2i = logit_scale * txt @ all_img.T
            labels = torch.arange(n, device=img.device) + rank * n
        else:
            # Every rank computes the whole global loss: the gathered backward sums ws equal
            # copies and the engine's averaging divides them out again.
            logits_i2t = logit_scale * all_img @ all_txt.T
            logits_t2i = logits_i2t.T
            labels = torch.arange(all_img.shape[0], device=img.device)
        loss = (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2
        return {"clip": loss}


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP) of the local images against the texts of all ranks.

    The sum over the global text batch, divided by the local batch size, gives each rank the
    per-image loss of the paper; averaged over ranks it equals the single-process loss.
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor, **_: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        img, txt = image_features.float(), text_features.float()
        rank, _ = world()
        all_txt = gather_with_grad(txt)
        n = img.shape[0]
        logits = logit_scale * img @ all_txt.T + logit_bias
        labels = -torch.ones_like(logits)
        idx = torch.arange(n, device=img.device)
        labels[idx, idx + rank * n] = 1.0
        loss = -F.logsigmoid(labels * logits).sum() / n
        return {"siglip": loss}


def build_contrastive_loss(cfg: ObjectiveConfig) -> nn.Module:
    return ClipLoss(cfg.local_loss) if cfg.contrastive == "clip" else SigLipLoss()
