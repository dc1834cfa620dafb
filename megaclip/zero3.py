"""What megaclip does specifically for DeepSpeed ZeRO-3: creating parameters partitioned in a
pinned dtype, gathering them for initialisation and for the teacher's forward, and the leaf
blocks (transformer blocks gathered whole, with no hooks inside them).

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


def set_leaf_blocks(model: nn.Module) -> None:
    """Make each transformer block of the model's towers and decoders (``model.leaf_blocks()``)
    one DeepSpeed leaf module: its parameters gathered and released together, no hooks on its
    submodules. A leaf must run once per training forward (DeepSpeed 0.19 reduces a leaf's
    gradients once per call, so a second call would add them twice); a forward that calls one
    twice fails with a message naming it, not with DeepSpeed's bare assertion in the gradient
    reduction that follows. A leaf that does not run in a step (the decoder of a term that
    starts later, ``start_at``) is neither gathered nor reduced; its parameters' gradient
    partitions keep the zeros DeepSpeed allocated them with until their first backward."""
    from deepspeed.utils import set_z3_leaf_module
    leaves = model.leaf_blocks()
    for blocks in leaves.values():
        for blk in blocks:
            set_z3_leaf_module(blk, True)
    _check_leaves_run_once(model, leaves)


def _check_leaves_run_once(model: nn.Module, leaves: dict[str, list[nn.Module]]) -> None:
    """(The blocks' recomputation under activation checkpointing happens after the forward and is
    not counted.)"""
    calls = {group: 0 for group in leaves}

    def reset(module, args):
        for group in calls:
            calls[group] = 0

    def count(group):
        def hook(module, args):
            calls[group] += 1
        return hook

    def check(module, args, output):
        twice = [g for g, n in calls.items() if n > 1]
        if twice and module.training and torch.is_grad_enabled():
            raise RuntimeError(
                f"the blocks of {', '.join(twice)} ran more than once in one training forward, "
                f"but they are ZeRO-3 leaf modules: give a tower all of its inputs in one call "
                f"(megaclip/models/blocks.py), or set model.zero3_leaf_blocks=false")

    for group, blocks in leaves.items():  # a pass through a group runs its first block
        if blocks:
            blocks[0].register_forward_pre_hook(count(group))
    if leaves:
        model.register_forward_pre_hook(reset)
        model.register_forward_hook(check)


def write_whole(model: nn.Module, names: Iterable[str], values: dict, writes: bool) -> None:
    """Write whole tensors into the parameters ``names`` of ``model``, one module at a time:
    under ZeRO-3 each module's parameters are gathered, the writing rank (rank 0) copies its
    ``values`` in, and the gather's exit partitions them to every rank; without ZeRO-3 every
    rank writes its own. Every rank calls it with the same ``names``; ``values`` (by name) is
    read only where ``writes``, and each value is dropped from it once written, so memory holds
    what is left of it and one module."""
    names = set(names)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            prefix = module_name + "." if module_name else ""
            own = [(prefix + n, p) for n, p in module.named_parameters(recurse=False)
                   if prefix + n in names]
            if not own:
                continue
            with gathered([p for _, p in own], modifier_rank=0):
                if writes:
                    for name, p in own:
                        p.data.copy_(values.pop(name).reshape(p.shape))
