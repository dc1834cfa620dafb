"""Contrastive negatives across gradient accumulation (``train.accum_negatives``, as open_clip's
``--accum-freq``): the contrastive loss over every micro-batch of an optimiser step on every
rank, not over one micro-batch times the ranks.

First a forward without gradient of each micro-batch keeps the features the contrastive term
reads. Then, micro-batch by micro-batch, a forward with gradient whose contrastive term reads
the cached features with this micro-batch's replaced by its fresh ones (all-gathered over the
ranks as always), and its backward. The gradient of a micro-batch flows through its own
features only, so the sum over the step is the gradient of the loss over the whole accumulated
global batch. The other terms (distillation, MLM, local-global) stay per micro-batch, averaged
over them as without the option; the EMA teacher runs once per micro-batch as always.

The towers draw no random numbers in their forward (no dropout, no drop path), so the cached
features equal the fresh ones (up to rounding: with MLM the fresh caption rows share a batch
with the masked caption); a stochastic layer added to them would break that equality (open_clip
has the same caveat).
"""
from __future__ import annotations

import torch

from megaclip.engine.step import poison_if_not_finite
from megaclip.objectives.passes import Passes
from megaclip.teacher.build import teacher_forward

# The model outputs that the contrastive term reads, with the dimension of their samples
# (``view_image_features`` is (views, B, E)), and the ones it reads once per micro-batch.
FEATURES = {"image_features": 0, "text_features": 0, "view_image_features": 1}
SHARED = ("logit_scale", "logit_bias")


def accumulates_negatives(train) -> bool:
    """Whether the steps of ``train`` (the config's ``train`` section) run the contrastive loss
    over all their micro-batches: with one micro-batch per step the option changes nothing."""
    return train.accum_negatives and train.grad_accum_steps > 1


def contrastive_inputs(batch: dict, passes: Passes) -> dict:
    """The inputs of a forward that computes what the contrastive term reads: the global views
    and the caption, with the patch mask only when that term reads the masked pass (FLIP-style);
    no local crops and no masked caption."""
    keys = ["images", "views", "tokens", "eot"]
    if not passes.full_views:
        keys += ["keep_index", "masked_index"]
    return {k: batch[k] for k in keys if k in batch}


@torch.no_grad()
def cache_features(engine, batches: list[dict], passes: Passes) -> list[dict]:
    """Each micro-batch's contrastive features, from a forward without gradient (under ZeRO-3
    DeepSpeed's hooks gather and release the parameters as in any forward)."""
    cache = []
    for batch in batches:
        outputs = engine(**contrastive_inputs(batch, passes))
        cache.append({k: outputs[k] for k in FEATURES if k in outputs})
    return cache


def grad_scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` with exactly its value, whose gradient is multiplied by ``factor``."""
    return x.detach() + (x - x.detach()) * factor


def with_cached_negatives(outputs: dict, cache: list[dict], j: int) -> dict:
    """What the contrastive term reads in micro-batch ``j``: the features of every micro-batch of
    the step, this one's fresh (with gradient) and the others' cached. The logit scale and bias
    keep 1/K of their gradient: each of the K backwards of the step reaches them, and the loss
    over the whole batch does once."""
    out = {}
    for key, dim in FEATURES.items():
        if key in outputs:
            parts = [c[key] for c in cache]
            parts[j] = outputs[key]
            out[key] = torch.cat(parts, dim=dim)
    for key in SHARED:
        if key in outputs:
            out[key] = grad_scaled(outputs[key], 1 / len(cache))
    return out


def train_steps_accumulated(engine, objective, batches: list[dict], teacher=None,
                            step: int = 0) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of one optimiser step (as many as the engine's gradient accumulation
    steps) through the engine, the contrastive term over all of them. Returns, per micro-batch,
    the detached terms and statistics for logging, as ``engine.step.train_step`` does: the
    contrastive term is the whole step's in each, the others the micro-batch's own."""
    passes, k = engine.module.passes, len(batches)
    cache = cache_features(engine, batches, passes)
    contrastive = objective.names["contrastive"]
    logged = []
    for j, batch in enumerate(batches):
        teacher_out = (teacher_forward(teacher, batch, passes)
                       if teacher is not None and passes.uses_teacher else None)
        outputs = engine(**batch)
        terms, stats = objective(outputs, batch, teacher_out, step,
                                 term_outputs={"contrastive": with_cached_negatives(
                                     outputs, cache, j)})
        rest = objective.total({n: v for n, v in terms.items() if n != contrastive})
        # Every backward of the step adds part of the whole step's contrastive gradient, so
        # DeepSpeed must not divide it by the accumulation steps; the other terms are the
        # micro-batch's own and are divided here instead.
        loss = objective.total({contrastive: terms[contrastive]}) + rest / k
        engine.backward(poison_if_not_finite(loss), scale_wrt_gas=False)
        engine.step()
        values = {n: v.detach() for n, v in {**terms, **stats}.items()}
        values["loss"] = objective.total(terms).detach()
        values["logit_scale"] = outputs["logit_scale"].detach()
        logged.append(values)
    return logged
