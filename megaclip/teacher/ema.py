"""The EMA teacher, kept in fp32 and, under ZeRO-3, sharded like the student (docs/methods.md §4).

Under ZeRO-3 every parameter is split evenly over the ranks, and the teacher is built with the
student's architecture under the same ``zero.Init`` partitioning, so rank r's shard of a teacher
parameter lines up with rank r's shard of the student's. Each rank therefore keeps only

* ``ema``: its fp32 shard of every teacher parameter (1/N of the teacher's fp32 size), and
* the teacher's working partition (``param.ds_tensor``, in the model dtype),

and the update reads the student's fp32 master shard (``safe_get_local_fp32_param``), blends it
into ``ema`` with a few ``torch._foreach_*`` calls and casts the result into the working
partition: no communication at all.

The forward needs whole parameters. A teacher whose working copy fits on the device
(``objective.teacher.whole_copy_max_gib``) keeps a whole copy in plain modules (``whole``) and
refreshes it once per optimiser step with one coalesced all-gather of every working partition,
started right after the update (``prefetch``) and waited for at the next forward, which then runs
with no gathers at all. A larger teacher gathers one block at a time at every forward, like the
student.

At ZeRO stages 1-2 parameters are whole on every rank but DeepSpeed's
optimiser cuts the fp32 masters over the ranks in flat buffers that do not line up with
parameters: each rank keeps the EMA of its own fragments, and the whole working copy is
refreshed by one all-gather per optimiser step (``fragments.py``). In fp32 at stage 0 (no
DeepSpeed optimiser partitions) the EMA is whole on every rank, read from the parameters; bf16
at stage 0 is refused (DeepSpeed's masters there are not linked to the parameters).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from megaclip.errors import UserError
from megaclip.teacher.fragments import FragmentCopy, holds_fragments
from megaclip.teacher.whole_copy import PREFIXES, WholeCopy
from megaclip.zero3 import gathered


def momentum_at(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine from ``start`` (step 0) to ``end`` (last step); fixed when they are equal."""
    if total_steps <= 1 or start == end:
        return start
    return end - (end - start) * (math.cos(math.pi * step / total_steps) + 1) / 2


class EmaTeacher:
    """EMA copy of the student's image trunk and its distillation heads.

    ``trunk``/``heads`` come from ``build_teacher_modules`` (the student's architecture, same
    partitioning, frozen; ``heads`` by the student's attribute name, ``distill_head`` and/or
    ``global_head``); ``student`` is the engine's module (``TwoTower``). One teacher serves
    both distillation terms.
    """

    def __init__(self, student: nn.Module, trunk: nn.Module, heads: dict[str, nn.Module],
                 dtype: torch.dtype,
                 whole: Optional[tuple[nn.Module, dict[str, nn.Module]]] = None):
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
        # False until ``init_from_student`` (or a checkpoint's EMA) sets it: a teacher whose
        # terms start late (start_at) is built with the student but initialised at their start.
        self.initialised = False
        self.whole = None
        self.fragments = None
        if not (self.partitioned or self.fp32_training
                or holds_fragments([s for _, _, s in self.pairs])):
            raise UserError(f"an EMA teacher in {str(dtype).replace('torch.', '')} needs the "
                            f"student's fp32 masters: use ZeRO stage 1, 2 or 3 (at stage 0 "
                            f"DeepSpeed keeps them where megaclip does not read them)")
        if holds_fragments([s for _, _, s in self.pairs]):  # ZeRO 1-2: fp32 in fragments
            self.fragments = FragmentCopy([name for name, _, _ in self.pairs],
                                          [p.data for _, p, _ in self.pairs],
                                          [s for _, _, s in self.pairs], lambda: self.ema)
        if whole is not None and self.partitioned:  # the forward runs on the whole copy
            w_trunk, w_heads = whole
            self.whole = WholeCopy(self.pairs, w_trunk, w_heads)
            self.trunk = w_trunk.eval()
            self.head = w_heads["distill_head"].eval() if self.head is not None else None
            self.global_head = w_heads["global_head"].eval() if self.global_head is not None else None

    # ------------------------------------------------------------------------ EMA state
    def _student_fp32(self, s: nn.Parameter) -> torch.Tensor:
        from deepspeed.utils import safe_get_local_fp32_param
        if self.partitioned:
            return safe_get_local_fp32_param(s)  # this rank's shard, no communication
        if self.fragments is not None:
            return s._hp_mapping.get_hp_fragment()  # this rank's fragment, no communication
        return s.data

    def _own_pairs(self) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        """The pairs whose EMA this rank holds (all of them but with fragments)."""
        if self.fragments is None:
            return self.pairs
        own = {i for i, _, _ in self.fragments.own}
        return [pair for i, pair in enumerate(self.pairs) if i in own]

    def _working(self, p: nn.Parameter) -> torch.Tensor:
        return p.ds_tensor if self.partitioned else p.data

    @torch.no_grad()
    def _refresh(self) -> None:
        """Cast the fp32 EMA into the teacher's working parameters (or their local partition);
        the whole copy, if any, is then out of date until its next gather."""
        if self.fragments is not None:  # the gather writes the working parameters
            self.fragments.stale()
            return
        work = [self._working(p) for _, p, _ in self.pairs]
        torch._foreach_copy_(work, [self.ema[name].view(w.shape)
                                    for (name, _, _), w in zip(self.pairs, work)])
        if self.whole is not None:
            self.whole.stale()

    def prefetch(self) -> None:
        """Start gathering the whole copy (every rank, after ``update``); no-op otherwise."""
        if self.whole is not None:
            self.whole.start()
        if self.fragments is not None:
            self.fragments.start()

    def settle(self) -> None:
        """Let a gather in flight finish (every rank, before the end of the process)."""
        if self.whole is not None:
            self.whole.settle()
        if self.fragments is not None:
            self.fragments.settle()

    @torch.no_grad()
    def init_from_student(self) -> None:
        """The EMA and the working copy set to the student's fp32 masters as they are now (no
        communication; the whole copy or fragments are gathered at the next forward)."""
        device = self.pairs[0][1].device  # the teacher's (an offloaded master is on the CPU)
        self.ema = {name: self._student_fp32(s).detach().to(device).float().clone()
                    for name, _, s in self._own_pairs()}
        self.initialised = True
        self._refresh()

    @torch.no_grad()
    def update(self, momentum: float, measure: bool = False) -> Optional[torch.Tensor]:
        """ema = m * ema + (1 - m) * student (fp32), then refresh the working copy. With
        ``measure``, also return the RMS of this update's change (0-dim, on the teacher's
        device; it costs one more read, so the trainer asks on log steps): over this rank's EMA
        tensors, or, with fragments of uneven sizes, over the whole teacher (one small
        all-reduce; every rank measures on the same steps)."""
        own = self._own_pairs()
        emas = [self.ema[name] for name, _, _ in own]
        students = [self._student_fp32(s).to(e.device, non_blocking=True).float()
                    for (_, _, s), e in zip(own, emas)]
        rms = None
        if measure:
            device = self.pairs[0][1].device
            sq = (torch.stack(torch._foreach_norm(torch._foreach_sub(students, emas))).square()
                  .sum() if emas else torch.zeros((), device=device))
            numel = torch.tensor(float(sum(e.numel() for e in emas)), device=device)
            if self.fragments is not None and self.fragments.world_size > 1:
                import torch.distributed as dist
                both = torch.stack([sq, numel])
                dist.all_reduce(both)
                sq, numel = both[0], both[1]
            rms = (sq / numel.clamp(min=1)).sqrt() * (1 - momentum)
        if emas:  # (a rank may hold no fragment of the teacher)
            torch._foreach_mul_(emas, momentum)
            torch._foreach_add_(emas, students, alpha=1 - momentum)
        self._refresh()
        return rms

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's fp32 EMA tensors (shards under ZeRO-3, fragments at stages 1-2, whole
        otherwise), on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.ema.items()}

    def whole_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole fp32 EMA, on the CPU: with fragments every rank's joined on rank 0 (a
        collective: every rank calls it, the others get an empty dict); with whole parameters
        this rank's. Not under ZeRO-3."""
        if self.fragments is not None:
            return self.fragments.join_fp32(self.ema)
        return self.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """This rank's tensors, as ``state_dict`` gives them; with fragments, whole tensors
        (which are cut here) are taken too."""
        if not self.initialised:  # the EMA's tensors are made (then overwritten) first
            self.init_from_student()
        if self.fragments is not None and all(
                state.get(name) is not None and state[name].numel() == p.numel()
                for name, p, _ in self.pairs):
            state = self.fragments.cut(state)
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
        """(fp32 EMA bytes held by this rank, fp32 bytes of the whole teacher); before the
        teacher is initialised, what it will hold."""
        if self.initialised:
            held = sum(v.numel() * v.element_size() for v in self.ema.values())
        elif self.fragments is not None:
            held = 4 * sum(n for _, _, n in self.fragments.own)
        else:
            held = 4 * sum(self._working(p).numel() for _, p, _ in self.pairs)
        return held, 4 * sum(self.full_numels().values())

    def describe_forward(self) -> str:
        if self.fragments is not None:
            return (f"whole {self.fragments.dtype} parameters ({self.fragments.bytes / 2**20:.1f} "
                    f"MiB) refreshed from every rank's fp32 fragments by one all-gather per "
                    f"optimiser step")
        if self.whole is not None:
            return (f"a whole {self.whole.dtype} copy ({self.whole.bytes / 2**20:.1f} MiB) gathered "
                    f"once per optimiser step")
        return "gathered block by block" if self.partitioned else "whole parameters"

    # ------------------------------------------------------------------------ forward
    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Every token of the teacher's trunk after its final norm, (B, 1 + N, width), gathering
        one block at a time (every rank must call it, as any ZeRO-3 forward)."""
        if self.whole is not None:
            self.whole.ready()
        if self.fragments is not None:
            self.fragments.ready()
        trunk = self.trunk
        with gathered(list(trunk.parameters(recurse=False)) + list(trunk.patch_embed.parameters())
                       + list(trunk.norm_pre.parameters())):
            x = trunk.embed(images)
        for blk in trunk.blocks:
            with gathered(blk.parameters()):
                x = blk(x)
        with gathered(trunk.norm.parameters()):
            return trunk.norm(x)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, patch_rows: Optional[int] = None,
                 outputs: Optional[tuple] = None) -> dict[str, torch.Tensor]:
        """The teacher's logits on full images, (B, 3, S, S): ``patch_logits`` (rows, N, K) at
        every patch of the first ``patch_rows`` images (all by default) through the MaskCLIP
        head, and ``global_logits`` (B, K) of every image's pooled token through the SILC head:
        one pass over the trunk serves both. ``outputs``: only those (default: every one the
        teacher has a head for)."""
        x = self.tokens(images)
        out = {}
        if self.head is not None and (outputs is None or "patch_logits" in outputs):
            with gathered(self.head.parameters()):
                out["patch_logits"] = self.head(x[:patch_rows, 1:])
        if self.global_head is not None and (outputs is None or "global_logits" in outputs):
            with gathered(self.global_head.parameters()):
                out["global_logits"] = self.global_head(x[:, 0])
        return out
