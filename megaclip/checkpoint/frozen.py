"""Locked parameters (outside the optimiser: ``model.lock_image``, ``model.lock_text``) of a
ZeRO-3 checkpoint resumed at another world size.

DeepSpeed saves each rank's partition of every parameter its optimiser does not hold in that
rank's model-states file (``frozen_param_fragments``) and puts it back only at the world size
that wrote it: its universal checkpoint carries the optimiser's parameters alone, so a locked
tower would silently keep the values the model was built with. Here rank 0 joins every saved
rank's fragments into whole tensors (as DeepSpeed's ``zero_to_fp32`` does) and writes them in
one module at a time (``zero3.write_whole``)."""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from megaclip.checkpoint.safe_load import weights_only_loads
from megaclip.distributed import on_rank0, rank
from megaclip.zero3 import is_partitioned, write_whole


def frozen_state(tag_dir: str, saved_world_size: int) -> dict[str, torch.Tensor]:
    """The whole value of every parameter a ZeRO-3 checkpoint's optimiser did not hold."""
    fragments: dict[str, list[torch.Tensor]] = {}
    shapes: dict = {}
    with weights_only_loads():
        for r in range(saved_world_size):
            path = os.path.join(tag_dir, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
            states = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            shapes = shapes or dict(states.get("frozen_param_shapes") or {})
            for name, part in (states.get("frozen_param_fragments") or {}).items():
                fragments.setdefault(name, []).append(part.flatten())
    out = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        out[name] = torch.cat(fragments[name])[:numel].view(tuple(shape)).clone()
    return out


def restore_frozen(model: nn.Module, tag_dir: str, saved_world_size: int) -> list[str]:
    """Write the checkpoint's values of ``model``'s locked parameters (ZeRO-3, after a load at
    another world size); returns their names. A locked parameter the checkpoint lacks is an
    error: resuming would start it from scratch."""
    locked = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    if not locked or not is_partitioned(model.parameters()):
        return []
    held: dict[str, torch.Tensor] = {}

    def read() -> list[str]:
        state = frozen_state(tag_dir, saved_world_size)
        lacking = [n for n in locked if n not in state]
        if lacking:
            from megaclip.errors import UserError
            raise UserError(f"checkpoint {tag_dir} has no saved value of the locked parameters "
                            f"{', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''} "
                            f"(were they trained, not locked, in the run that wrote it?)")
        held.update({n: state[n] for n in locked})
        return locked

    names = on_rank0(read)
    write_whole(model, names, held, writes=rank() == 0)
    return names
