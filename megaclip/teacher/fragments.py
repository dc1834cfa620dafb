"""The EMA teacher at ZeRO stages 1-2 (and bf16 at stage 0): each rank keeps the fp32 EMA of
its own fragment of the optimiser's fp32 masters, and the whole working copy is refreshed by one
all-gather per optimiser step (docs/methods.md §4).

There, the parameters are whole on every rank, but DeepSpeed's optimiser holds the fp32 masters
in flat buffers cut evenly over the ranks, across parameter boundaries: rank r holds a
*fragment* (a contiguous range, possibly empty) of some parameters (``param._hp_mapping``).
Reading a whole fp32 parameter costs an all-reduce of its full size
(``safe_get_full_fp32_param``), one per teacher parameter per step. Instead each rank blends
its own fragments (no communication), then every rank's fragments, cast to the model dtype,
travel in one all-gather and are written into the whole teacher parameters. The EMA held per
rank is 1/N of the teacher, as under ZeRO-3.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

Address = tuple[int, int, int]  # (index of the pair, start in the flat parameter, numel)


def holds_fragments(params: list[nn.Parameter]) -> bool:
    """Whether DeepSpeed's optimiser links these (whole) parameters to fp32 fragments."""
    return bool(params) and all(hasattr(p, "_hp_mapping") for p in params) and not any(
        hasattr(p, "ds_id") for p in params)


def own_addresses(students: list[nn.Parameter]) -> list[Address]:
    """This rank's fragment of each student parameter that has one."""
    out = []
    for i, s in enumerate(students):
        mapping = s._hp_mapping
        if mapping is not None and mapping.lp_fragment_address.numel > 0:
            out.append((i, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel))
    return out


class FragmentCopy:
    """The whole working parameters of the teacher (``targets``, in the model dtype), refreshed
    from every rank's fp32 EMA fragments by one all-gather."""

    def __init__(self, names: list[str], targets: list[torch.Tensor],
                 students: list[nn.Parameter]):
        import torch.distributed as dist

        from megaclip.distributed import world
        self.names, self.targets = names, targets
        self.own = own_addresses(students)
        self.world_size = world()[1]
        tables: list = [self.own]
        if self.world_size > 1:
            tables = [None] * self.world_size
            dist.all_gather_object(tables, self.own)
        self.tables: list[list[Address]] = tables
        covered = [0] * len(targets)
        for table in tables:
            for i, _, n in table:
                covered[i] += n
        short = [names[i] for i, t in enumerate(targets) if covered[i] != t.numel()]
        if short:
            raise RuntimeError(f"the ranks' fp32 fragments do not cover the teacher parameters "
                               f"{short[:3]} exactly once")
        self.width = max(sum(n for _, _, n in table) for table in tables)
        self.dtype, device = targets[0].dtype, targets[0].device
        self.send = torch.zeros(self.width, dtype=self.dtype, device=device)
        self.bytes = sum(t.numel() * t.element_size() for t in targets)
        self._stale, self._recv, self._work = True, None, None

    # ------------------------------------------------------------------------ EMA <-> fragments
    def own_names(self) -> list[str]:
        return [self.names[i] for i, _, _ in self.own]

    def cut(self, whole: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's fragments of whole tensors, by name."""
        return {self.names[i]: whole[self.names[i]].reshape(-1)[start:start + n].clone()
                for i, start, n in self.own}

    @torch.no_grad()
    def join_fp32(self, ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every rank's fp32 fragments joined into whole tensors, on the CPU (a collective:
        every rank calls it and gets the result)."""
        import torch.distributed as dist
        send = torch.zeros(self.width, dtype=torch.float32, device=self.send.device)
        self._pack(send, ema)
        recv = send
        if self.world_size > 1:
            recv = torch.empty(self.world_size * self.width, dtype=torch.float32,
                               device=send.device)
            dist.all_gather_into_tensor(recv, send)
        whole = [torch.empty(t.shape, dtype=torch.float32) for t in self.targets]
        self._unpack(recv.cpu(), whole)
        return dict(zip(self.names, whole))

    def _pack(self, buffer: torch.Tensor, ema: dict[str, torch.Tensor]) -> None:
        offset, views, values = 0, [], []
        for i, _, n in self.own:
            views.append(buffer[offset:offset + n])
            values.append(ema[self.names[i]])
            offset += n
        if views:
            torch._foreach_copy_(views, values)

    def _unpack(self, recv: torch.Tensor, targets: list[torch.Tensor]) -> None:
        views, values = [], []
        for r, table in enumerate(self.tables):
            offset = r * self.width
            for i, start, n in table:
                views.append(targets[i].view(-1)[start:start + n])
                values.append(recv[offset:offset + n])
                offset += n
        torch._foreach_copy_(views, values)

    # ------------------------------------------------------------------------ the working copy
    def stale(self) -> None:
        """The EMA changed: a gather in flight carries old values and is dropped."""
        if self._work is not None:
            self._work.wait()
        self._stale, self._recv, self._work = True, None, None

    @torch.no_grad()
    def start(self, ema: dict[str, torch.Tensor]) -> None:
        """Start the all-gather of every rank's fragments (every rank, in the same order as its
        other collectives)."""
        if not self._stale or self._recv is not None:
            return
        import torch.distributed as dist
        self._pack(self.send, ema)
        if self.world_size == 1:
            self._recv = self.send
            return
        self._recv = torch.empty(self.world_size * self.width, dtype=self.dtype,
                                 device=self.send.device)
        self._work = dist.all_gather_into_tensor(self._recv, self.send, async_op=True)

    def settle(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None

    @torch.no_grad()
    def ready(self, ema: dict[str, torch.Tensor]) -> None:
        """Wait for the gather (starting it if nobody did) and write it into the parameters."""
        if not self._stale:
            return
        self.start(ema)
        if self._work is not None:
            self._work.wait()
        self._unpack(self._recv, self.targets)
        self._stale, self._recv, self._work = False, None, None
