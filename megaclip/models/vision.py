"""Image tower: a timm VisionTransformer pooled at the class token, then a bias-free projection
(or, SigLIP's, without a class token, pooled by timm's attention pooling, with no projection).

The trunk can run on the visible patches only (MAE-style token dropping): the masked student
pass of MaskCLIP costs about a quarter of a full pass at the default 75% mask ratio. It also
takes other image sizes than its own (SILC's local crops): timm's dynamic image size
interpolates the position embeddings, and leaves them untouched at the native size.

Several passes (the whole views, the masked view, the local crops) run through the trunk in one
call: each is embedded on its own, then every block takes all of their token sequences at once
(``models/blocks.py``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from megaclip.config import ModelConfig
from megaclip.models.blocks import MultiBlock, act_layer, run_blocks

Pass = tuple[torch.Tensor, Optional[torch.Tensor]]  # (images (B, 3, H, W), kept patches (B, K))


def tokens_at(patches_BNW: torch.Tensor, index_BK: torch.Tensor) -> torch.Tensor:
    """The patch tokens at ``index`` (per sample), in index order."""
    return patches_BNW.gather(1, index_BK[..., None].expand(-1, -1, patches_BNW.shape[-1]))


class MaskableViT(VisionTransformer):
    """timm's ViT whose forward takes the indices of the patches to keep and returns every
    token after the final norm, class token first: (B, 1 + kept, width); with ``more`` passes,
    a list of those, one per pass, every block called once for all of them."""

    def __init__(self, **kwargs):
        super().__init__(block_fn=MultiBlock, **kwargs)

    def embed(self, images_BCHW: torch.Tensor, keep_BK: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self._pos_embed(self.patch_embed(images_BCHW))  # class token + position embeddings
        if keep_BK is not None:
            x = torch.cat([x[:, :1], tokens_at(x[:, 1:], keep_BK)], dim=1)
        return self.norm_pre(self.patch_drop(x))

    def forward(self, images_BCHW: torch.Tensor, keep_BK: Optional[torch.Tensor] = None,
                more: Sequence[Pass] = ()):
        xs = tuple(self.embed(images, keep) for images, keep in ((images_BCHW, keep_BK), *more))
        xs = run_blocks(self.blocks, xs, self.grad_checkpointing and self.training)
        if not more:
            return self.norm(xs[0])
        return [self.norm(x) for x in xs]


def build_trunk(image_size: int, patch_size: int, width: int, depth: int, heads: int,
                mlp_ratio: float, pre_norm: bool = False, act: str = "gelu",
                pool: str = "token") -> MaskableViT:
    """``pool``: ``token`` (a class token) or ``map`` (no class token; the trunk's ``attn_pool``
    pools the tokens its forward returns)."""
    return MaskableViT(img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth,
                       num_heads=heads, mlp_ratio=mlp_ratio, num_classes=0, global_pool=pool,
                       class_token=pool == "token", dynamic_img_size=True, pre_norm=pre_norm,
                       act_layer=act_layer(act))


def trunk_for(cfg: ModelConfig) -> MaskableViT:
    """The image trunk of a resolved model config (the student's, the teacher's, a probe's)."""
    v = cfg.vision
    return build_trunk(v.image_size, v.patch_size, v.width, v.depth, v.heads, v.mlp_ratio,
                       v.pre_norm, cfg.act, v.pool)


class VisionTower(nn.Module):
    """ViT trunk + linear projection of the class token to the joint space (``pool="token"``), or
    the trunk's attention pooling of its tokens, in the joint space already (``pool="map"``).

    The trunk is called as a module (``self.trunk(x)``), never through its methods, so that
    ZeRO-3's pre-forward hooks gather its directly owned parameters (cls token, pos embed).
    """

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 mlp_ratio: float, embed_dim: int, pre_norm: bool = False, act: str = "gelu",
                 pool: str = "token"):
        super().__init__()
        self.trunk = build_trunk(image_size, patch_size, width, depth, heads, mlp_ratio, pre_norm,
                                 act, pool)
        self.proj = nn.Linear(width, embed_dim, bias=False) if pool == "token" else None

    @property
    def num_patches(self) -> int:
        return self.trunk.patch_embed.num_patches

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, images_BCHW: torch.Tensor, keep_BK: Optional[torch.Tensor] = None,
                more: Sequence[Pass] = ()):
        """-> (projected class-token feature (B, embed_dim), all tokens (B, 1 + kept, width));
        with ``more`` (further (images, kept patches or None) passes), a list of those pairs,
        one per pass, the first for ``images_BCHW``, all through the trunk in one call."""
        tokens = self.trunk(images_BCHW, keep_BK, more)
        if self.proj is None:  # attention pooling: one call per pass (their lengths may differ)
            if not more:
                return self.trunk.attn_pool(tokens), tokens
            return [(self.trunk.attn_pool(t), t) for t in tokens]
        if not more:
            return self.proj(tokens[:, 0]), tokens
        features = self.proj(torch.cat([t[:, 0] for t in tokens]))
        return list(zip(features.split([t.shape[0] for t in tokens]), tokens))
