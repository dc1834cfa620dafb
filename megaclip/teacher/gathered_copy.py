"""Whole working parameters of the teacher refreshed by one all-gather of every rank's part, once
per optimiser step: started right after the EMA update and waited for at the next forward
(docs/methods.md §4). ``whole_copy.py`` (ZeRO-3 partitions) and ``fragments.py`` (ZeRO 1-2
fragments of the fp32 masters) say what each rank sends and where the gathered values go."""
from __future__ import annotations

import torch


class GatheredCopy:
    """Every rank packs ``width`` values (``_pack``) into one buffer; the buffers are gathered as
    (world, width) and unpacked into the whole parameters (``_unpack``)."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device):
        self.width, self.dtype = width, dtype
        self.send = torch.zeros(width, dtype=dtype, device=device)
        self._stale, self._recv, self._work = True, None, None

    def _pack(self, send: torch.Tensor) -> None:
        raise NotImplementedError

    def _unpack(self, recv: torch.Tensor) -> None:
        """``recv``: (world x width,), rank r's buffer at [r * width, (r + 1) * width)."""
        raise NotImplementedError

    def stale(self) -> None:
        """The sources changed: a gather in flight carries old values and is dropped."""
        if self._work is not None:
            self._work.wait()
        self._stale, self._recv, self._work = True, None, None

    @torch.no_grad()
    def start(self) -> None:
        """Start the all-gather (every rank, in the same order as its other collectives)."""
        if not self._stale or self._recv is not None:
            return
        import torch.distributed as dist

        from megaclip.distributed import world
        self._pack(self.send)
        ws = world()[1]
        if ws == 1:
            self._recv = self.send
            return
        self._recv = torch.empty(ws * self.width, dtype=self.dtype, device=self.send.device)
        self._work = dist.all_gather_into_tensor(self._recv, self.send, async_op=True)

    def settle(self) -> None:
        """Wait for a gather in flight (before the process group goes away), keeping its result."""
        if self._work is not None:
            self._work.wait()
            self._work = None

    @torch.no_grad()
    def ready(self) -> None:
        """Wait for the gather (starting it if nobody did) and unpack it into the parameters."""
        if not self._stale:
            return
        self.start()
        if self._work is not None:
            self._work.wait()
        self._unpack(self._recv)
        self._stale, self._recv, self._work = False, None, None
