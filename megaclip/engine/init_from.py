"""Pretrained weights into a freshly built model (``model.init_from``), at the first start only.

Under ZeRO-3 rank 0 alone reads the file and converts it (``checkpoint/pretrained.py``,
``checkpoint/convert_in.py``); every rank then gathers one module at a time, as
``init_weights`` does, rank 0 writes the module's tensors and the gather's exit partitions them
to every rank (``zero3.write_whole``). So no rank holds more than the file and one whole
module, and only rank 0 reads the file. Without ZeRO-3 every rank holds the whole model anyway and reads the file itself.
A problem with the file (a crafted pickle, a mismatched shape, an architecture option the
config lacks) is every rank's ``UserError`` before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megaclip.checkpoint import convert_in, pretrained
from megaclip.config import ModelConfig
from megaclip.distributed import on_rank0, rank
from megaclip.errors import UserError
from megaclip.zero3 import is_partitioned, write_whole


@dataclass
class Plan:
    """What rank 0 found: the model names it will write, and the report's lines."""
    names: list[str]
    report: list[str]


def model_shapes(model: nn.Module) -> dict[str, tuple]:
    """Every parameter's whole shape (under ZeRO-3 the local tensor is a flat shard)."""
    return {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}


def convert_file(cfg: ModelConfig, shapes: dict[str, tuple]
                 ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the file's tensors under the model's names, the report) for a resolved ``cfg``."""
    path = pretrained.locate(cfg.init_from)
    state = pretrained.read_weights(path)
    fmt = convert_in.detect_format(state)
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values()})
    act, told = convert_in.file_activation(pretrained.beside(path), path)
    if act is not None and act != cfg.act:
        raise UserError(f"model.init_from: the file's blocks use {act} ({told}) but model.act is "
                        f"{cfg.act}: set model.act={act}")
    converted = convert_in.from_pretrained(state, shapes, cfg, cfg.init_from_towers)
    loaded, missing = converted.state, sorted(set(shapes) - set(converted.state))
    report = [
        f"init_from {path} ({fmt}, {', '.join(dtypes)}, {len(state)} tensors): loaded "
        f"{len(loaded)} into {', '.join(converted.parts)}",
        f"init_from: missing {len(missing)} (left at their init)"
        + (f": {convert_in.shown(missing)}" if missing else ""),
        f"init_from: unused {len(converted.unused)} (in the file, not loaded)"
        + (f": {convert_in.shown(converted.unused)}" if converted.unused else ""),
        (f"init_from: activation {act}: {told}" if act is not None else
         f"init_from: activation cannot be told: {told}; the run uses model.act={cfg.act} "
         f"(OpenAI CLIP's weights need quick_gelu)"),
    ]
    report += [f"init_from: {note}" for note in converted.notes]
    return loaded, report


def _every_rank_or_none(read):
    """``read()`` on every rank (each needs the whole weights without ZeRO-3); a rank that
    cannot read the file (not there on its node, broken) stops every rank, not itself alone."""
    import torch.distributed as dist

    from megaclip.distributed import all_reduce_sum, rank_device, world
    error = None
    try:
        plan = read()
    except UserError as e:
        error = e
    if world()[1] > 1 and dist.is_initialized():
        failed = all_reduce_sum(torch.tensor([float(error is not None)], device=rank_device()))
        if error is None and failed.item():
            raise UserError("model.init_from: another rank could not read the file (its error is "
                            "in the log): every rank needs it")
    if error is not None:
        raise error
    return plan


def load_init_weights(model: nn.Module, cfg: ModelConfig) -> list[str]:
    """Write ``cfg.init_from``'s weights into ``model`` (built and initialised; before the
    optimiser and the engine, so DeepSpeed's fp32 masters start from them). Returns the report's
    lines (the same on every rank)."""
    shapes = model_shapes(model)
    split = is_partitioned(model.parameters())
    held: dict[str, torch.Tensor] = {}

    def read() -> Plan:
        state, report = convert_file(cfg, shapes)
        held.update(state)
        return Plan(sorted(state), report)

    plan = on_rank0(read) if split else _every_rank_or_none(read)
    write_whole(model, plan.names, held, writes=not split or rank() == 0)
    return plan.report
