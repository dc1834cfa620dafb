"""Analytic FLOP count of the two-tower model (matmuls only, multiply-add = 2 FLOPs)."""
from __future__ import annotations

from megaclip.config import ModelConfig


def transformer_flops(tokens: int, width: int, depth: int, mlp_ratio: float) -> float:
    per_layer = 2 * tokens * (4 * width * width + 2 * mlp_ratio * width * width)  # qkv, proj, mlp
    per_layer += 2 * 2 * tokens * tokens * width  # q @ k^T and attn @ v
    return depth * per_layer


def forward_flops_per_sample(cfg: ModelConfig) -> float:
    """Forward FLOPs of one image-text pair through a resolved model config."""
    v, t = cfg.vision, cfg.text
    patches = (v.image_size // v.patch_size) ** 2
    vision = 2 * patches * 3 * v.patch_size ** 2 * v.width  # patch embedding
    vision += transformer_flops(patches + 1, v.width, v.depth, v.mlp_ratio)
    vision += 2 * v.width * cfg.embed_dim
    text = transformer_flops(t.context_length, t.width, t.depth, t.mlp_ratio)
    text += 2 * t.width * cfg.embed_dim
    return float(vision + text)


def train_flops_per_sample(cfg: ModelConfig) -> float:
    """Forward + backward (2x forward); recomputation by activation checkpointing not counted."""
    return 3.0 * forward_flops_per_sample(cfg)
