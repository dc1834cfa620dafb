"""Building the EMA teacher of a student (docs/methods.md §4) and running it on a batch as the
objective's passes say."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megaclip.config import ModelConfig, ObjectiveConfig
from megaclip.models.build import teacher_heads
from megaclip.models.towers import view_major
from megaclip.models.vision import trunk_for
from megaclip.teacher.ema import EmaTeacher
from megaclip.zero3 import check_dtype, partitioned


def build_teacher_modules(cfg: ModelConfig, objective: ObjectiveConfig,
                          zero3_config: Optional[dict] = None, dtype: torch.dtype = torch.float32
                          ) -> tuple[nn.Module, dict[str, nn.Module]]:
    """(image trunk, heads by the student's attribute name: ``distill_head`` for MaskCLIP,
    ``global_head`` for SILC) with the student's architecture, created in the student's order
    and partitioned exactly like the student's under ZeRO-3. Their values are copied from the
    student, not drawn."""
    with partitioned(zero3_config, dtype):
        trunk = trunk_for(cfg)
        heads = teacher_heads(cfg, objective)
    if zero3_config is None:
        trunk, heads = trunk.to(dtype), {k: h.to(dtype) for k, h in heads.items()}
    for module in (trunk, *heads.values()):
        for p in module.parameters():
            p.requires_grad_(False)
    check_dtype(trunk, dtype, "the EMA teacher's trunk")
    for name, head in heads.items():
        check_dtype(head, dtype, f"the EMA teacher's {name}")
    return trunk, heads


def build_ema_teacher(student: nn.Module, model_cfg, objective_cfg,
                      zero3_config: Optional[dict], dtype: torch.dtype,
                      device: torch.device, initialise: bool = True) -> EmaTeacher:
    """The EMA teacher of ``student`` (the engine's module), initialised from it (with
    ``initialise``; otherwise later, by ``init_from_student``, when its terms start). Under
    ZeRO-3 its forward runs on a whole copy when that copy is at most
    ``objective.teacher.whole_copy_max_gib``, otherwise block by block."""
    trunk, heads = build_teacher_modules(model_cfg, objective_cfg, zero3_config, dtype)
    trunk, heads = trunk.to(device), {k: h.to(device) for k, h in heads.items()}
    whole = None
    if zero3_config is not None:
        modules = (trunk, *heads.values())
        gib = sum(p.ds_numel * p.ds_tensor.element_size() for m in modules
                  for p in m.parameters()) / 2**30
        on_device = all(p.ds_tensor.device == device for m in modules for p in m.parameters())
        if on_device and 0 < gib <= objective_cfg.teacher.whole_copy_max_gib:  # not offloaded
            with torch.device("meta"):  # every value comes from the gather; no RNG drawn
                w_trunk, w_heads = build_teacher_modules(model_cfg, objective_cfg, None, dtype)
            whole = (w_trunk.to_empty(device=device),
                     {k: h.to_empty(device=device) for k, h in w_heads.items()})
            for source, copy in zip(modules, (whole[0], *whole[1].values())):
                for (_, b), (_, c) in zip(source.named_buffers(), copy.named_buffers()):
                    c.copy_(b)
    teacher = EmaTeacher(student, trunk, heads, dtype, whole)
    if initialise:
        teacher.init_from_student()
    return teacher


def teacher_forward(teacher: EmaTeacher, batch: dict, passes) -> dict[str, torch.Tensor]:
    """The teacher's pass over the global views its outputs need (``passes``: the objective's
    ``Passes`` at this step): every global view when it reads their pooled logits (SILC), and
    the patch logits of the first one (MaskCLIP's masked view) from the same pass; only the
    outputs ``passes`` lists."""
    images, rows = batch["images"], batch["images"].shape[0]
    if "global_logits" in passes.teacher_outputs and "views" in batch and batch["views"].shape[1]:
        images = view_major(images, batch["views"])
    return teacher(images, patch_rows=rows, outputs=passes.teacher_outputs)
