"""Image tower: a timm VisionTransformer pooled at the class token, then a bias-free projection."""
from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class VisionTower(nn.Module):
    """timm ViT trunk (``num_classes=0``, class-token pooling) + linear projection to the joint space.

    The trunk is called as a module (``self.trunk(x)``), never through ``forward_features``, so
    that ZeRO-3's pre-forward hooks gather its directly owned parameters (cls token, pos embed).
    """

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 mlp_ratio: float, embed_dim: int):
        super().__init__()
        self.trunk = VisionTransformer(
            img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth,
            num_heads=heads, mlp_ratio=mlp_ratio, num_classes=0, global_pool="token",
            class_token=True, dynamic_img_size=False,
        )
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(images_BCHW))
