"""Light decoders of the self-distillation objectives.

``MaskedPatchDecoder``: the student's visible tokens, a learnable mask token at the masked
positions, position embeddings, ``depth`` transformer blocks; read at the masked positions.
``TextMlmDecoder``: ``depth`` bidirectional blocks over the text encoder's tokens, then logits
over the vocabulary at the chosen positions.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from megaclip.models.vision import tokens_at


class MaskedPatchDecoder(nn.Module):
    def __init__(self, width: int, num_patches: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, width))
        self.blocks = nn.ModuleList(
            [Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens_B1K: torch.Tensor, keep_BK: torch.Tensor,
                masked_BM: torch.Tensor) -> torch.Tensor:
        """``tokens``: class token + kept patch tokens from the encoder; ``keep``/``masked``: patch
        indices. Returns the decoded tokens at the masked positions, (B, M, width)."""
        B, _, W = tokens_B1K.shape
        N = self.pos_embed.shape[1] - 1
        patches = self.mask_token.to(tokens_B1K.dtype).expand(B, N, W).clone()
        patches.scatter_(1, keep_BK[..., None].expand(-1, -1, W), tokens_B1K[:, 1:])
        x = torch.cat([tokens_B1K[:, :1], patches], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(tokens_at(x[:, 1:], masked_BM))


class TextMlmDecoder(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float, vocab_size: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            [Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab_size)

    def forward(self, tokens_BLW: torch.Tensor, eot_B: torch.Tensor,
                index_BK: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, vocab) at the positions ``index`` (``data.masks.mlm_indices``: fixed
        shape, so no output size depends on the data). Padding after the end-of-text token is
        not attended to."""
        L = tokens_BLW.shape[1]
        valid = torch.arange(L, device=eot_B.device)[None] <= eot_B[:, None]  # (B, L)
        attn = valid[:, None, None, :]  # broadcast over heads and queries
        x = tokens_BLW
        for blk in self.blocks:
            x = blk(x, attn_mask=attn)
        return self.out(self.norm(tokens_at(x, index_BK)))
