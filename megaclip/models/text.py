"""Text tower: CLIP-style causal transformer; the feature is read at the end-of-text token (or,
SigLIP's, a bidirectional one read at the last position, padding included)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megaclip.models.blocks import MultiBlock, act_layer, run_blocks


class TextTower(nn.Module):
    """Token + position embeddings, causal pre-norm blocks (timm's ``Block``), final LayerNorm,
    feature at the end-of-text position, bias-free projection.

    The end-of-text index comes with the batch (the tokenizer knows it), so the model never needs
    a special token id. SigLIP's tower: ``causal=False``, ``pool="last"``, ``proj_bias=True``.
    """

    def __init__(self, vocab_size: int, context_length: int, width: int, depth: int, heads: int,
                 mlp_ratio: float, embed_dim: int, mask_embedding: bool = False,
                 act: str = "gelu", causal: bool = True, pool: str = "eot",
                 proj_bias: bool = False):
        super().__init__()
        self.context_length = context_length
        self.causal, self.pool = causal, pool
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.blocks = nn.ModuleList(
            [MultiBlock(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True, act_layer=act_layer(act))
             for _ in range(depth)])
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=proj_bias)
        # The learnable [MASK] input of masked language modelling (no vocabulary id needed).
        self.mask_embedding = nn.Parameter(torch.zeros(width)) if mask_embedding else None
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def encode_tokens(self, tokens_BL: torch.Tensor, causal: bool = True,
                      masked_BL: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-token features after the final LayerNorm, shape (B, L, width). Positions in
        ``masked`` read the [MASK] embedding instead of their token's."""
        x = self.token_embedding(tokens_BL)
        if masked_BL is not None:
            x = torch.where(masked_BL[..., None], self.mask_embedding.to(x.dtype), x)
        x = x + self.positional_embedding[: tokens_BL.shape[1]]
        x, = run_blocks(self.blocks, (x,), self.grad_checkpointing and self.training,
                        is_causal=causal)
        return self.ln_final(x)

    def forward(self, tokens_BL: torch.Tensor, eot_B: torch.Tensor,
                masked_BL: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (projected end-of-text feature (B, embed_dim), all tokens (B, L, width)).

        ``eot_B`` may cover only the first rows: the feature is read for those (the caption
        rows when the masked caption rows of MLM ride in the same batch)."""
        x = self.encode_tokens(tokens_BL, causal=self.causal, masked_BL=masked_BL)
        if self.pool == "last":
            pooled = x[: eot_B.shape[0], -1]
        else:
            pooled = x[torch.arange(eot_B.shape[0], device=x.device), eot_B]
        return self.proj(pooled), x
