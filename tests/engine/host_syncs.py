"""Recording what would make the host wait for a GPU, on a machine without one.

On the CPU nothing waits, so a regression is invisible in timings: this module records the
operations themselves while ``HostSyncs`` is active.

- aten ops (``TorchDispatchMode``, so DeepSpeed's and timm's code are seen too): a scalar read
  (``_local_scalar_dense``: ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``if t:``),
  ``nonzero``, ``masked_select``, ``is_nonzero``, indexing with a boolean mask (its output
  size depends on the data), ``unique``;
- calls (``TorchFunctionMode``): ``Tensor.tolist``, ``.item``, ``.cpu``, ``.numpy``,
  ``bool()/float()/int()`` on a tensor, ``torch.nonzero``/``masked_select``/``where(cond)``,
  ``torch.tensor`` / ``torch.as_tensor`` of host data with a ``device`` argument (a
  host-to-device copy from pageable memory, which waits for the stream), and indexing with a
  boolean tensor.

Each event is recorded with the innermost frame of megaclip, DeepSpeed or timm that caused it.
"""
from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_ATEN = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "is_nonzero",
         "item", "_unique2", "unique_dim", "unique_consecutive", "argwhere", "nonzero_numpy"}
_METHODS = {"tolist", "item", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__",
            "nonzero", "masked_select", "argwhere"}
_FACTORIES = (torch.tensor, torch.as_tensor)


def _where() -> str:
    for frame in reversed(traceback.extract_stack()[:-3]):
        path = frame.filename
        if "host_syncs.py" in path:
            continue
        for root in ("megaclip/", "deepspeed/", "timm/", "torch/nn/"):
            if root in path:
                return f"{path[path.index(root):]}:{frame.lineno} {frame.line}"
    return "?"


def _bool_index(args) -> bool:
    if len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], (tuple, list)) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if self.owner.recording:
            if name in _ATEN:
                self.owner.record(f"aten.{name}")
            elif name in ("index", "_index_put_impl_", "index_put", "index_put_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool
                    for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple))
                              else ())):
                self.owner.record(f"aten.{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.owner.recording:
            name = getattr(func, "__name__", "")
            if func in _FACTORIES and kwargs.get("device") is not None and not (
                    args and isinstance(args[0], torch.Tensor)):
                self.owner.record(f"torch.{name}(..., device=) of host data")
            elif name in _METHODS and args and isinstance(args[0], torch.Tensor):
                self.owner.record(f"Tensor.{name}")
            elif name == "__getitem__" and _bool_index(args):
                self.owner.record("indexing with a boolean mask")
            elif func is torch.where and len(args) == 1 and not kwargs:
                self.owner.record("torch.where(condition)")
        return func(*args, **kwargs)


class HostSyncs:
    """``with HostSyncs() as s: ...`` records into ``s.events`` (what, where); ``pause()`` is a
    context in which nothing is recorded (work that is allowed to wait, such as the data loader
    or DeepSpeed's optimiser step)."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []
        self.recording = False
        self._modes = None

    def record(self, what: str) -> None:
        self.recording = False  # what the traceback machinery does is not recorded
        try:
            self.events.append((what, _where()))
        finally:
            self.recording = True

    def __enter__(self):
        self._modes = (_Function(self), _Dispatch(self))
        for m in self._modes:
            m.__enter__()
        self.recording = True
        return self

    def __exit__(self, *exc):
        self.recording = False
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False

    def pause(self):
        owner = self

        class _Paused:
            def __enter__(self):
                self.was, owner.recording = owner.recording, False

            def __exit__(self, *exc):
                owner.recording = self.was
                return False
        return _Paused()

    def summary(self) -> str:
        counts: dict[tuple[str, str], int] = {}
        for e in self.events:
            counts[e] = counts.get(e, 0) + 1
        return "\n".join(f"{n} x {what} at {where}" for (what, where), n in counts.items())
