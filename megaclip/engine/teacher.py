"""The EMA teacher, kept in fp32 and, under ZeRO-3, sharded like the student (METHODS.md 4).

Under ZeRO-3 every parameter is split evenly over the ranks, and the teacher is built with the
student's architecture under the same ``zero.Init`` partitioning, so rank r's shard of a teacher
parameter lines up with rank r's shard of the student's. Each rank therefore keeps only

* ``ema``: its fp32 shard of every teacher parameter (1/N of the teacher's fp32 size), and
* the teacher's working partition (``param.ds_tensor``, in the model dtype),

and the update reads the student's fp32 master shard (``safe_get_local_fp32_param``), blends it
into ``ema`` and casts the result into the working partition: no communication at all. The
forward pass gathers one block at a time, like the student's.

At ZeRO stages 0-2 parameters are whole on every rank, so the fp32 EMA is whole too. Its source
is the module parameter itself in fp32 training; in bf16 the fp32 masters of stages 1-2 are
partitioned in flat buffers that do not line up with parameters, so the fp32 value is gathered
(``safe_get_full_fp32_param``): the one case where the update communicates.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Optional

import torch
from torch import nn

# Teacher state names -> the student's: the trunk, MaskCLIP's patch head ("head.", the name
# checkpoints have always used) and SILC's head on the pooled token.
PREFIXES = {"trunk": ("trunk.", "visual.trunk."), "distill_head": ("head.", "distill_head."),
            "global_head": ("global_head.", "global_head.")}


def momentum_at(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine from ``start`` (step 0) to ``end`` (last step); fixed when they are equal."""
    if total_steps <= 1 or start == end:
        return start
    return end - (end - start) * (math.cos(math.pi * step / total_steps) + 1) / 2


def _gathered(params: Iterable[nn.Parameter]):
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params)


class EmaTeacher:
    """EMA copy of the student's image trunk and its distillation heads.

    ``trunk``/``heads`` come from ``build_teacher_modules`` (the student's architecture, same
    partitioning, frozen; ``heads`` by the student's attribute name, ``distill_head`` and/or
    ``global_head``); ``student`` is the engine's module (``TwoTower``). One teacher serves
    both distillation terms.
    """

    def __init__(self, student: nn.Module, trunk: nn.Module, heads: dict[str, nn.Module],
                 dtype: torch.dtype):
        self.trunk = trunk.eval()
        self.head = heads["distill_head"].eval() if "distill_head" in heads else None
        self.global_head = heads["global_head"].eval() if "global_head" in heads else None
        s_params = dict(student.named_parameters())
        self.pairs: list[tuple[str, nn.Parameter, nn.Parameter]] = []
        for key, module in (("trunk", trunk), *heads.items()):
            prefix, s_prefix = PREFIXES[key]
            for name, p in module.named_parameters():
                self.pairs.append((prefix + name, p, s_params[s_prefix + name]))
        self.partitioned = any(hasattr(p, "ds_id") for _, p, _ in self.pairs)
        self.fp32_training = dtype == torch.float32
        self.ema: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------ EMA state
    def _student_fp32(self, s: nn.Parameter) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param
        if self.partitioned:
            return safe_get_local_fp32_param(s)  # this rank's shard, no communication
        if self.fp32_training:
            return s.data
        return safe_get_full_fp32_param(s)

    def _working(self, p: nn.Parameter) -> torch.Tensor:
        return p.ds_tensor if self.partitioned else p.data

    @torch.no_grad()
    def _refresh(self) -> None:
        """Cast the fp32 EMA into the teacher's working parameters (or their local partition)."""
        for name, p, _ in self.pairs:
            work = self._working(p)
            work.copy_(self.ema[name].view(work.shape))

    @torch.no_grad()
    def init_from_student(self) -> None:
        self.ema = {name: self._student_fp32(s).detach().float().clone()
                    for name, _, s in self.pairs}
        self._refresh()

    @torch.no_grad()
    def update(self, momentum: float, measure: bool = False) -> Optional[torch.Tensor]:
        """ema = m * ema + (1 - m) * student (fp32), then refresh the working copy. With
        ``measure``, also return the RMS of this update's change over this rank's EMA tensors
        (0-dim, on their device; it costs one more read, so the trainer asks on log steps)."""
        sq, numel = None, 0
        for name, _, s in self.pairs:
            ema, student = self.ema[name], self._student_fp32(s).float()
            if measure:
                change = (student - ema).square().sum() * (1 - momentum) ** 2
                sq, numel = change if sq is None else sq + change, numel + ema.numel()
            ema.mul_(momentum).add_(student, alpha=1 - momentum)
        self._refresh()
        return (sq / max(1, numel)).sqrt() if measure and sq is not None else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's fp32 EMA tensors (shards under ZeRO-3, whole otherwise), on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.ema.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.ema) - set(state))
        if missing:
            raise KeyError(f"teacher state lacks {missing[:5]}")
        for name, value in self.ema.items():
            if state[name].shape != value.shape:
                raise ValueError(f"teacher state {name}: shape {tuple(state[name].shape)} "
                                 f"!= {tuple(value.shape)}")
            value.copy_(state[name])
        self._refresh()

    def full_numels(self) -> dict[str, int]:
        return {name: int(getattr(p, "ds_numel", p.numel())) for name, p, _ in self.pairs}

    def memory_bytes(self) -> tuple[int, int]:
        """(fp32 EMA bytes held by this rank, fp32 bytes of the whole teacher)."""
        held = sum(v.numel() * v.element_size() for v in self.ema.values())
        return held, 4 * sum(self.full_numels().values())

    # ------------------------------------------------------------------------ forward
    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Every token of the teacher's trunk after its final norm, (B, 1 + N, width), gathering
        one block at a time (every rank must call it, as any ZeRO-3 forward)."""
        trunk = self.trunk
        with _gathered(list(trunk.parameters(recurse=False)) + list(trunk.patch_embed.parameters())
                       + list(trunk.norm_pre.parameters())):
            x = trunk.embed(images)
        for blk in trunk.blocks:
            with _gathered(blk.parameters()):
                x = blk(x)
        with _gathered(trunk.norm.parameters()):
            return trunk.norm(x)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, patch_rows: Optional[int] = None
                 ) -> dict[str, torch.Tensor]:
        """The teacher's logits on full images, (B, 3, S, S): ``patch_logits`` (rows, N, K) at
        every patch of the first ``patch_rows`` images (all by default) through the MaskCLIP
        head, and ``global_logits`` (B, K) of every image's pooled token through the SILC head:
        one pass over the trunk serves both."""
        x = self.tokens(images)
        out = {}
        if self.head is not None:
            with _gathered(self.head.parameters()):
                out["patch_logits"] = self.head(x[:patch_rows, 1:])
        if self.global_head is not None:
            with _gathered(self.global_head.parameters()):
                out["global_logits"] = self.global_head(x[:, 0])
        return out
