"""One training step: teacher targets, forward, named loss terms, the weighted sum, backward,
optimiser step."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megaclip.config import ObjectiveConfig
from megaclip.data.masks import split_indices
from megaclip.data.views import normalise
from megaclip.losses import build_contrastive_loss
from megaclip.losses.distill import MaskedDistillLoss
from megaclip.losses.local_global import LocalGlobalLoss
from megaclip.losses.mlm import MlmLoss
from megaclip.models.towers import view_major


class Objective(nn.Module):
    """The configured loss modules and the one place where their terms are weighted.

    ``forward`` returns (terms, statistics): terms enter the total, statistics are only logged.
    """

    def __init__(self, cfg: ObjectiveConfig, total_steps: int):
        super().__init__()
        self.contrastive = build_contrastive_loss(cfg)
        self.weights = {cfg.contrastive: cfg.contrastive_weight}
        self.distill = self.mlm = self.local_global = None
        if cfg.mask_distill.weight > 0:
            self.distill = MaskedDistillLoss(cfg.mask_distill, total_steps)
            self.weights["distill"] = cfg.mask_distill.weight
        if cfg.local_global.weight > 0:
            self.local_global = LocalGlobalLoss(cfg.local_global, total_steps)
            self.weights["local_global"] = cfg.local_global.weight
        if cfg.text_mlm.weight > 0:
            self.mlm = MlmLoss()
            self.weights["mlm"] = cfg.text_mlm.weight

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                teacher_out: Optional[dict[str, torch.Tensor]] = None, step: int = 0
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``teacher_out``: the EMA teacher's ``patch_logits`` / ``global_logits``. With several
        global views the contrastive term is the mean of its value on each (each against the
        same texts, at the batch size of one view)."""
        shared = {k: v for k, v in outputs.items() if k in ("text_features", "logit_scale",
                                                            "logit_bias")}
        views = [outputs["image_features"], *outputs.get("view_image_features", ())]
        per_view = [self.contrastive(image_features=f, **shared) for f in views]
        terms = {k: sum(t[k] for t in per_view) / len(per_view) for k in per_view[0]}
        stats: dict[str, torch.Tensor] = {}
        if self.distill is not None:
            t, s = self.distill(outputs["student_patch_logits"], teacher_out["patch_logits"],
                                batch["masked_index"], step)
            terms.update(t)
            stats.update(s)
        if self.local_global is not None:
            student = outputs["global_student_logits"]
            teacher = teacher_out["global_logits"].unflatten(0, (-1, student.shape[1]))
            t, s = self.local_global(student, teacher, step)
            terms.update(t)
            stats.update(s)
        if self.mlm is not None:
            terms.update(self.mlm(outputs["mlm_logits"], batch["tokens"], batch["mlm_target"]))
        return terms, stats

    def end_step(self, applied: bool) -> None:
        """Once per optimiser step, on every rank: statistics gathered over its micro-batches
        (the distillation centres) are folded in if the step was applied, dropped if skipped."""
        for loss in (self.distill, self.local_global):
            if loss is not None:
                loss.end_step(applied)

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[k] * v for k, v in terms.items())


def to_device(batch: dict, device: torch.device, dtype: torch.dtype,
              mean: Optional[tuple] = None, std: Optional[tuple] = None) -> dict:
    """The model's inputs on ``device``; uint8 images (as the loader hands them out) are
    normalised there with ``mean`` / ``std`` (data.mean / data.std), float ones taken as they
    are; a patch mask becomes visible/masked index lists."""
    out = {}
    for key in ("images", "views", "local_views"):
        if key in batch:
            x = batch[key].to(device, non_blocking=True)
            if not x.is_floating_point():
                if mean is None or std is None:
                    raise ValueError(f"batch['{key}'] is {x.dtype}: to_device needs mean and std")
                x = normalise(x, mean, std)
            out[key] = x.to(dtype)
    for key in ("tokens", "eot", "mlm_tokens", "mlm_target", "mlm_embed"):
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True)
    if "image_mask" in batch:
        keep, masked = split_indices(batch["image_mask"])
        out["keep_index"] = keep.to(device, non_blocking=True)
        out["masked_index"] = masked.to(device, non_blocking=True)
    return out


def poison_if_not_finite(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` whose gradients are all NaN if it is not finite (no host sync). A non-finite loss
    can have finite gradients (an infinite term that does not depend on the parameters, a
    weight times an infinite statistic); poisoned, its step is one DeepSpeed's gradient-norm
    check discards on every rank, like any other non-finite step."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)


def teacher_forward(teacher, batch: dict) -> dict[str, torch.Tensor]:
    """The teacher's pass: over the global views when there are several (SILC), the patch
    logits of the first one (MaskCLIP's masked view) from the same pass."""
    images, rows = batch["images"], batch["images"].shape[0]
    if teacher.global_head is not None and "views" in batch and batch["views"].shape[1]:
        images = view_major(images, batch["views"])
    return teacher(images, patch_rows=rows)


def train_step(engine, objective: Objective, batch: dict, teacher=None,
               step: int = 0) -> dict[str, torch.Tensor]:
    """One micro-batch through the DeepSpeed engine; the engine decides when the optimiser steps
    (gradient accumulation boundaries). Returns detached terms and statistics for logging."""
    teacher_out = teacher_forward(teacher, batch) if teacher is not None else None
    outputs = engine(**batch)
    terms, stats = objective(outputs, batch, teacher_out, step)
    loss = poison_if_not_finite(objective.total(terms))
    engine.backward(loss)
    engine.step()
    logged = {k: v.detach() for k, v in {**terms, **stats}.items()}
    logged["loss"] = loss.detach()
    logged["logit_scale"] = outputs["logit_scale"].detach()
    return logged
