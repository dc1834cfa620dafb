"""A whole working copy of a ZeRO-3 teacher, refreshed by one coalesced all-gather once per
optimiser step (docs/methods.md §4)."""
from __future__ import annotations

import torch
from torch import nn

from megaclip.teacher.gathered_copy import GatheredCopy

# Teacher state names -> the student's: the trunk, MaskCLIP's patch head ("head.", the name
# checkpoints have always used) and SILC's head on the pooled token.
PREFIXES = {"trunk": ("trunk.", "visual.trunk."), "distill_head": ("head.", "distill_head."),
            "global_head": ("global_head.", "global_head.")}


class WholeCopy(GatheredCopy):
    """Whole working copies of a ZeRO-3 teacher's parameters, in plain modules of the same
    architecture, refreshed by one all-gather of every rank's working partitions.

    Rank r holds elements [r*s, (r+1)*s) of each flattened parameter (``s`` its partition
    size, the last one padded); the partitions are packed into one buffer, gathered as
    (world, total) and each parameter is read back from its column range."""

    def __init__(self, pairs: list, trunk: nn.Module, heads: dict[str, nn.Module]):
        whole = {}
        for key, module in (("trunk", trunk), *heads.items()):
            for name, p in module.named_parameters():
                p.requires_grad_(False)
                whole[PREFIXES[key][0] + name] = p
        self.parts = [p for _, p, _ in pairs]
        self.targets = [whole[name] for name, _, _ in pairs]
        for (name, p, _), t in zip(pairs, self.targets):
            if tuple(t.shape) != tuple(p.ds_shape) or t.dtype != p.ds_tensor.dtype:
                raise ValueError(f"whole teacher copy of {name}: {tuple(t.shape)} {t.dtype}, "
                                 f"partitioned {tuple(p.ds_shape)} {p.ds_tensor.dtype}")
        self.sizes = [p.ds_tensor.numel() for p in self.parts]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.total = sum(self.sizes)
        super().__init__(self.total, self.parts[0].ds_tensor.dtype, self.parts[0].ds_tensor.device)
        self.send_views = [self.send[o:o + n] for o, n in zip(self.offsets, self.sizes)]
        self.bytes = sum(t.numel() * t.element_size() for t in self.targets)

    def _pack(self, send: torch.Tensor) -> None:
        torch._foreach_copy_(self.send_views, [p.ds_tensor for p in self.parts])

    def _unpack(self, recv: torch.Tensor) -> None:
        rows = recv.view(-1, self.total)
        for t, o, n in zip(self.targets, self.offsets, self.sizes):
            t.copy_(rows[:, o:o + n].reshape(-1)[:t.numel()].view(t.shape))
