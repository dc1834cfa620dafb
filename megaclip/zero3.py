"""What megaclip does specifically for DeepSpeed ZeRO-3: creating parameters partitioned in a
pinned dtype, gathering them for initialisation and for the teacher's forward, and the leaf-block
policy (which transformer blocks are gathered whole, with no hooks inside them).

Everything here is a no-op without a ZeRO-3 config: the same model code runs at any stage.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
from torch import nn


def partitioned(zero3_config: Optional[dict], dtype: torch.dtype):
    """``deepspeed.zero.Init`` that creates parameters in ``dtype`` on every machine (a null
    context without ``zero3_config``).

    DeepSpeed 0.19.8 drops an explicit ``dtype`` when the accelerator reports no fp16 support
    (``dtype or fp16 if fp16_supported else bf16 ...`` in ``Init._set_dtype``), so a CPU without
    oneDNN fp16 got bf16 parameters in an fp32 run. ``dtype=None`` makes DeepSpeed read the
    dtype from the config, which is where ``model_dtype`` reads it too; the dtype is then pinned
    in case another DeepSpeed version decides differently, and ``check_dtype`` verifies it."""
    if zero3_config is None:
        return contextlib.nullcontext()
    import deepspeed
    init = deepspeed.zero.Init(config_dict_or_path=zero3_config, dtype=None)
    init.dtype = dtype
    return init


def check_dtype(module: nn.Module, dtype: torch.dtype, what: str = "the model") -> None:
    """Every floating parameter (its local partition under ZeRO-3) and buffer is ``dtype``."""
    tensors = [(n, getattr(p, "ds_tensor", p)) for n, p in module.named_parameters()]
    tensors += list(module.named_buffers())
    wrong = [(n, t.dtype) for n, t in tensors if t.is_floating_point() and t.dtype != dtype]
    if wrong:
        raise RuntimeError(f"{len(wrong)} tensors of {what} are not {dtype}, e.g. {wrong[:3]}")


def is_partitioned(params: Iterable[nn.Parameter]) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


def gathered(params: Iterable[nn.Parameter], modifier_rank: Optional[int] = None):
    """Whole values of the partitioned ones among ``params`` inside the context (with
    ``modifier_rank``, that rank's changes are partitioned again on exit); a null context when
    none is partitioned."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def set_leaf_blocks(model: nn.Module, towers: tuple[str, ...]) -> None:
    """Make each transformer block of ``towers`` (the towers a training forward runs once, from
    the objective's ``Passes``) one DeepSpeed leaf module, and make a training forward that runs
    one of them twice fail with a message naming the tower, not with DeepSpeed's bare assertion
    in the gradient reduction that follows. ``model`` has ``tower_blocks(tower)``."""
    from deepspeed.utils import set_z3_leaf_module
    leaves = {tower: model.tower_blocks(tower) for tower in towers}
    for blocks in leaves.values():
        for blk in blocks:
            set_z3_leaf_module(blk, True)
    _check_leaves_run_once(model, leaves)


def _check_leaves_run_once(model: nn.Module, leaves: dict[str, list[nn.Module]]) -> None:
    """(The blocks' recomputation under activation checkpointing happens after the forward and is
    not counted.)"""
    calls = {tower: 0 for tower in leaves}

    def reset(module, args):
        for tower in calls:
            calls[tower] = 0

    def count(tower):
        def hook(module, args):
            calls[tower] += 1
        return hook

    def check(module, args, output):
        twice = [t for t, n in calls.items() if n > 1]
        if twice and module.training and torch.is_grad_enabled():
            raise RuntimeError(
                f"the {', '.join(twice)} tower ran more than once in one training forward, but "
                f"its blocks are ZeRO-3 leaf modules (the objective's Passes in megaclip/"
                f"objectives/terms.py say it runs once); set model.zero3_leaf_blocks=false or "
                f"correct the term's passes")

    for tower, blocks in leaves.items():  # a pass of a tower runs its first block
        blocks[0].register_forward_pre_hook(count(tower))
    if leaves:
        model.register_forward_pre_hook(reset)
        model.register_forward_hook(check)
