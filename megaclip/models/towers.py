"""The two-tower model: image tower, text tower, learnable temperature (and SigLIP bias)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megaclip.models.text import TextTower
from megaclip.models.vision import VisionTower


class TwoTower(nn.Module):
    """Returns L2-normalised image/text features and the (clamped) logit scale.

    The clamp happens here, inside ``forward``: under ZeRO-3 the module's copy of
    ``logit_scale`` is an empty placeholder outside forward, so clamping it in place after the
    optimiser step would silently do nothing.
    """

    def __init__(self, visual: VisionTower, text: TextTower, init_logit_scale: float,
                 max_logit_scale: float, init_logit_bias: Optional[float] = None):
        super().__init__()
        self.visual = visual
        self.text = text
        self.max_log_scale = math.log(max_logit_scale)
        # Shape (1,), not a 0-d tensor: ZeRO-3 partitions parameters through a byte view.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(init_logit_scale)))
        self.logit_bias = (nn.Parameter(torch.full((1,), float(init_logit_bias)))
                           if init_logit_bias is not None else None)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides biases and norms (timm contract)."""
        return {"logit_scale", "logit_bias", "visual.trunk.cls_token", "visual.trunk.pos_embed",
                "text.positional_embedding", "text.token_embedding.weight"}

    def forward(self, images: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None,
                eot: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["image_features"] = F.normalize(self.visual(images), dim=-1)
        if tokens is not None:
            out["text_features"] = F.normalize(self.text(tokens, eot), dim=-1)
        out["logit_scale"] = self.logit_scale.clamp(max=self.max_log_scale).exp()[0]
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias[0]
        return out
