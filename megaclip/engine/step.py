"""One training step: teacher targets, forward, named loss terms, the weighted sum, backward,
optimiser step."""
from __future__ import annotations

from typing import Optional

import torch

from megaclip.data.masks import mlm_indices, split_indices
from megaclip.data.views import normalise
from megaclip.objectives.loss import ObjectiveLoss
from megaclip.teacher.build import teacher_forward


def to_device(batch: dict, device: torch.device, dtype: torch.dtype,
              mean: Optional[tuple] = None, std: Optional[tuple] = None) -> dict:
    """The model's inputs on ``device``; uint8 images (as the loader hands them out) are
    normalised there with ``mean`` / ``std`` (data.mean / data.std), float ones taken as they
    are; masks travel as index lists (the data pipeline draws them; a batch built without the
    pipeline gets them here, on the host): nothing in the step reads a device value."""
    out = {}
    for key in ("images", "views", "local_views"):
        if key in batch:
            x = batch[key].to(device, non_blocking=True)
            if not x.is_floating_point():
                if mean is None or std is None:
                    raise ValueError(f"batch['{key}'] is {x.dtype}: to_device needs mean and std")
                x = normalise(x, mean, std)
            out[key] = x.to(dtype)
    batch = dict(batch)
    if "image_mask" in batch and "keep_index" not in batch:
        batch["keep_index"], batch["masked_index"] = split_indices(batch["image_mask"])
    if "mlm_target" in batch and "mlm_index" not in batch:
        batch["mlm_index"], batch["mlm_valid"] = mlm_indices(batch["mlm_target"])
    for key in ("tokens", "eot", "mlm_tokens", "mlm_index", "mlm_valid", "mlm_embed",
                "keep_index", "masked_index"):
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True)
    return out


def poison_if_not_finite(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` whose gradients are all NaN if it is not finite (no host sync). A non-finite loss
    can have finite gradients (an infinite term that does not depend on the parameters, a
    weight times an infinite statistic); poisoned, its step is one DeepSpeed's gradient-norm
    check discards on every rank, like any other non-finite step."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)


def train_step(engine, objective: ObjectiveLoss, batch: dict, teacher=None,
               step: int = 0) -> dict[str, torch.Tensor]:
    """One micro-batch through the DeepSpeed engine; the engine decides when the optimiser steps
    (gradient accumulation boundaries). Returns detached terms and statistics for logging."""
    # The student first: the teacher's whole-copy gather, started after the last optimiser
    # step, is in flight meanwhile; the teacher's forward waits for it.
    outputs = engine(**batch)
    passes = engine.module.passes  # this step's (a term that starts later reads no teacher)
    teacher_out = (teacher_forward(teacher, batch, passes)
                   if teacher is not None and passes.uses_teacher else None)
    terms, stats = objective(outputs, batch, teacher_out, step)
    loss = poison_if_not_finite(objective.total(terms))
    engine.backward(loss)
    engine.step()
    logged = {k: v.detach() for k, v in {**terms, **stats}.items()}
    logged["loss"] = loss.detach()
    logged["logit_scale"] = outputs["logit_scale"].detach()
    return logged
