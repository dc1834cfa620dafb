"""The EMA teacher at ZeRO stages 1-2: each rank keeps the fp32 EMA of
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

from typing import Callable

import torch
from torch import nn

from megaclip.teacher.gathered_copy import GatheredCopy

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


class FragmentCopy(GatheredCopy):
    """The whole working parameters of the teacher (``targets``, in the model dtype), refreshed
    from every rank's fp32 EMA fragments (``ema()``: this rank's, by name) by one all-gather."""

    def __init__(self, names: list[str], targets: list[torch.Tensor],
                 students: list[nn.Parameter], ema: Callable[[], dict[str, torch.Tensor]]):
        import torch.distributed as dist

        from megaclip.distributed import world
        self.names, self.targets, self.ema = names, targets, ema
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
        super().__init__(max(sum(n for _, _, n in table) for table in tables), targets[0].dtype,
                         targets[0].device)
        self.bytes = sum(t.numel() * t.element_size() for t in targets)

    def cut(self, whole: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's fragments of whole tensors, by name."""
        return {self.names[i]: whole[self.names[i]].reshape(-1)[start:start + n].clone()
                for i, start, n in self.own}

    @torch.no_grad()
    def join_fp32(self, ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every rank's fp32 fragments joined into whole tensors, on rank 0's CPU (a
        collective: every rank calls it; the others get an empty dict)."""
        from megaclip.distributed import rank
        import torch.distributed as dist
        send = torch.zeros(self.width, dtype=torch.float32, device=self.send.device)
        self._pack_values(send, ema)
        recv = send
        if self.world_size > 1:
            recv = torch.empty(self.world_size * self.width, dtype=torch.float32,
                               device=send.device)
            dist.all_gather_into_tensor(recv, send)
        if rank() != 0:
            return {}
        whole = [torch.empty(t.shape, dtype=torch.float32) for t in self.targets]
        self._unpack_into(recv.cpu(), whole)
        return dict(zip(self.names, whole))

    def _pack(self, send: torch.Tensor) -> None:
        self._pack_values(send, self.ema())

    def _unpack(self, recv: torch.Tensor) -> None:
        self._unpack_into(recv, self.targets)

    def _pack_values(self, buffer: torch.Tensor, ema: dict[str, torch.Tensor]) -> None:
        offset, views, values = 0, [], []
        for i, _, n in self.own:
            views.append(buffer[offset:offset + n])
            values.append(ema[self.names[i]])
            offset += n
        if views:
            torch._foreach_copy_(views, values)

    def _unpack_into(self, recv: torch.Tensor, targets: list[torch.Tensor]) -> None:
        views, values = [], []
        for r, table in enumerate(self.tables):
            offset = r * self.width
            for i, start, n in table:
                views.append(targets[i].view(-1)[start:start + n])
                values.append(recv[offset:offset + n])
                offset += n
        torch._foreach_copy_(views, values)
