"""The transformer block of both towers: timm's ``Block``, called once per training forward
with every token sequence the objective runs through the tower.

An objective may run a tower over several inputs in one training forward: MaskCLIP's whole and
masked views, SILC's global views and local crops (different lengths, so they cannot share one
batch), the caption and the masked caption. Each block takes all of those sequences in one call
(``MultiBlock``), so it runs once per training forward whatever the objective, and every block of
every objective can be a ZeRO-3 leaf module: one gather of its parameters, no hooks on its
submodules, one gradient reduction (DeepSpeed reduces a leaf's gradients once per call, so a
leaf called twice would count them twice).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from timm.layers import get_act_layer
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint


def act_layer(name: str) -> type[nn.Module]:
    """The MLP activation called ``name`` (``model.act``); torch's GELU for ``gelu``, as timm's
    blocks use by default."""
    return nn.GELU if name == "gelu" else get_act_layer(name)


class MultiBlock(Block):
    """timm's ``Block`` (same parameters and names) that takes one or several token sequences,
    of any lengths, and runs each through the block in this one call: ``blk(x)`` -> tensor,
    ``blk(x1, x2)`` -> (y1, y2). One call per training forward is what a ZeRO-3 leaf module
    needs (DeepSpeed reduces a leaf's gradients once per call)."""

    def forward(self, *xs: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False):
        out = tuple(super(MultiBlock, self).forward(x, attn_mask=attn_mask, is_causal=is_causal)
                    for x in xs)
        return out[0] if len(out) == 1 else out


def run_blocks(blocks: Sequence[nn.Module], xs: tuple[torch.Tensor, ...], checkpointing: bool,
               **kwargs) -> tuple[torch.Tensor, ...]:
    """Every sequence of ``xs`` through each block in turn, one call per block (recomputed in
    the backward with ``checkpointing``)."""
    for blk in blocks:
        out = (checkpoint(blk, *xs, use_reentrant=False, **kwargs) if checkpointing
               else blk(*xs, **kwargs))
        xs = out if isinstance(out, tuple) else (out,)
    return xs
