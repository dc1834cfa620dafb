"""Counting the collectives a process makes and the bytes they move, and the ZeRO-3 module
hooks that fire, for the benchmarks.

``CollectiveStats.install()`` wraps every collective of ``torch.distributed`` (and of
``distributed_c10d``, which DeepSpeed's coalesced gathers call directly). Install it before
``init_distributed``: DeepSpeed looks its all-gather and reduce-scatter functions up once, when
its backend is created. Counting only happens between ``start()`` and ``stop()``.

Bytes are the payload of one call: the whole gathered tensor of a gather, the whole input of a
reduce-scatter, the tensor of an all-reduce or broadcast (what a ring moves about once per rank).
"""
from __future__ import annotations

import functools
from collections import Counter

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
         "reduce_scatter_tensor", "broadcast", "reduce", "all_to_all", "all_to_all_single",
         "gather", "scatter", "send", "recv", "isend", "irecv", "all_reduce_coalesced", "barrier")
# (the deprecated _all_gather_base / _reduce_scatter_base call the public ones: counted there)


def _bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_bytes(x) for x in obj)
    return 0


def payload_bytes(args: tuple, kwargs: dict) -> int:
    """The larger of the first two tensor arguments (output/input, positional or by name)."""
    values = list(args[:2]) + [kwargs[k] for k in ("tensor", "output_tensor", "input_tensor",
                                                   "output", "input", "tensor_list",
                                                   "input_list", "output_tensor_list")
                               if k in kwargs]
    return max((_bytes(v) for v in values), default=0)


class CollectiveStats:
    """Calls and bytes per collective name while counting."""

    def __init__(self):
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()
        self.counting = False

        self.hooks = 0  # ZeRO-3 module hooks fired (forward and backward, before and after)

    def install(self) -> "CollectiveStats":
        for module in (dist, c10d):
            for name in NAMES:
                fn = getattr(module, name, None)
                if fn is None or getattr(fn, "_megaclip_counted", None) is self:
                    continue

                def counted(*args, __fn=fn, __name=name, **kwargs):
                    if self.counting:
                        self.calls[__name] += 1
                        self.bytes[__name] += payload_bytes(args, kwargs)
                    return __fn(*args, **kwargs)

                counted = functools.wraps(fn)(counted)
                counted._megaclip_counted = self
                setattr(module, name, counted)
        self._install_hook_counter()
        return self

    def _install_hook_counter(self) -> None:
        """Every ZeRO-3 module hook ends in one of these four methods of DeepSpeed's parameter
        coordinator owner (each a gather or release decision and its Python around it)."""
        from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
        for name in ("pre_sub_module_forward_function", "post_sub_module_forward_function",
                     "pre_sub_module_backward_function", "post_sub_module_backward_function"):
            fn = getattr(DeepSpeedZeRoOffload, name)
            if getattr(fn, "_megaclip_counted", None) is self:
                continue

            def counted(*args, __fn=fn, **kwargs):
                if self.counting:
                    self.hooks += 1
                return __fn(*args, **kwargs)

            counted = functools.wraps(fn)(counted)
            counted._megaclip_counted = self
            setattr(DeepSpeedZeRoOffload, name, counted)

    def start(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.hooks = 0
        self.counting = True

    def stop(self) -> None:
        self.counting = False

    def summary(self, per: int = 1) -> dict:
        """Totals and per-name figures, divided by ``per`` (e.g. the number of steps)."""
        return {"collectives": sum(self.calls.values()) / per, "zero3_hooks": self.hooks / per,
                "bytes": sum(self.bytes.values()) / per,
                "by_name": {k: {"calls": self.calls[k] / per, "bytes": self.bytes[k] / per}
                            for k in sorted(self.calls)}}
