"""The terms an objective is made of, each one entry: its config section, its loss module, the
passes it needs and how its loss reads the model's and the teacher's outputs.

Adding an objective term is a loss module (``losses/``), a config section and one ``Term``
given to ``register_term``: the model's forward, the teacher, the FLOPs
count, the loss weighting and the checkpoint (its buffers, under ``objective.<attr>.*``) follow
from it. The built-in terms are listed below in the order their values are summed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from megaclip.objectives.config import ObjectiveConfig
from megaclip.objectives.passes import Passes

Outputs = dict[str, torch.Tensor]
TermValues = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]  # (terms, statistics)


@dataclass(frozen=True)
class Term:
    """One term of the objective.

    ``section``: the attribute of ``ObjectiveConfig`` holding its settings (a dataclass with a
    ``weight``; 0 turns the term off), or None for the contrastive term; ``config``: that
    section's dataclass, for a term registered from outside (built-in sections are fields of
    ``ObjectiveConfig``); ``attr``: the loss module's attribute in ``ObjectiveLoss`` (its
    buffers are saved as ``objective.<attr>.*``); ``build(objective_cfg, total_steps)``: the loss
    module; ``passes(objective_cfg)``: what it needs run; ``compute(module, outputs, batch,
    teacher_out, step)``: (terms, statistics), terms named as in ``name``; ``owns``: name
    prefixes of the student's parameters that only this term trains (a term that starts late
    leaves them untouched until then, ``objectives/stages.py``)."""
    attr: str
    section: Optional[str]
    build: Callable[[ObjectiveConfig, int], nn.Module]
    passes: Callable[[ObjectiveConfig], Passes]
    compute: Callable[[nn.Module, Outputs, dict, Optional[Outputs], int], TermValues]
    name: Optional[Callable[[ObjectiveConfig], str]] = None  # default: ``attr``
    config: Optional[type] = field(default=None, compare=False)
    owns: tuple = ()

    def settings(self, cfg: ObjectiveConfig) -> Any:
        return getattr(cfg, self.section) if self.section else None

    def weight(self, cfg: ObjectiveConfig) -> float:
        return cfg.contrastive_weight if self.section is None else self.settings(cfg).weight

    def enabled(self, cfg: ObjectiveConfig) -> bool:
        return self.section is None or self.weight(cfg) > 0

    def term_name(self, cfg: ObjectiveConfig) -> str:
        return self.name(cfg) if self.name is not None else self.attr


# ------------------------------------------------------------------------------ built-ins
def _contrastive(cfg: ObjectiveConfig, total_steps: int) -> nn.Module:
    from megaclip.losses import build_contrastive_loss
    return build_contrastive_loss(cfg)


def _contrastive_passes(cfg: ObjectiveConfig) -> Passes:
    if cfg.contrastive_view == "masked":  # FLIP-style: the masked pass is the image feature
        return Passes(masked_image=True, caption=True)
    return Passes(full_views=1, caption=True)


def _contrastive_values(loss, outputs, batch, teacher_out, step) -> TermValues:
    """The mean over the global views of the loss on each (each against the same texts, at the
    batch size of one view)."""
    shared = {k: v for k, v in outputs.items() if k in ("text_features", "logit_scale",
                                                        "logit_bias")}
    views = [outputs["image_features"], *outputs.get("view_image_features", ())]
    per_view = [loss(image_features=f, **shared) for f in views]
    return {k: sum(t[k] for t in per_view) / len(per_view) for k in per_view[0]}, {}


def _distill(cfg: ObjectiveConfig, total_steps: int) -> nn.Module:
    from megaclip.losses.distill import MaskedDistillLoss
    return MaskedDistillLoss(cfg.mask_distill, total_steps)


def _distill_values(loss, outputs, batch, teacher_out, step) -> TermValues:
    return loss(outputs["student_patch_logits"], teacher_out["patch_logits"],
                batch["masked_index"], step)


def _local_global(cfg: ObjectiveConfig, total_steps: int) -> nn.Module:
    from megaclip.losses.local_global import LocalGlobalLoss
    return LocalGlobalLoss(cfg.local_global, total_steps)


def _local_global_passes(cfg: ObjectiveConfig) -> Passes:
    lg = cfg.local_global
    return Passes(full_views=lg.global_crops, local_views=lg.local_crops,
                  teacher_views=lg.global_crops, teacher_outputs=("global_logits",))


def _local_global_values(loss, outputs, batch, teacher_out, step) -> TermValues:
    student = outputs["global_student_logits"]
    teacher = teacher_out["global_logits"].unflatten(0, (-1, student.shape[1]))
    return loss(student, teacher, step)


def _mlm(cfg: ObjectiveConfig, total_steps: int) -> nn.Module:
    from megaclip.losses.mlm import MlmLoss
    return MlmLoss()


def _mlm_values(loss, outputs, batch, teacher_out, step) -> TermValues:
    return loss(outputs["mlm_logits"], batch["tokens"], batch["mlm_index"],
                batch["mlm_valid"]), {}


BUILTIN_TERMS: tuple[Term, ...] = (
    Term("contrastive", None, _contrastive, _contrastive_passes, _contrastive_values,
         name=lambda cfg: cfg.contrastive),
    # MaskCLIP (docs/methods.md §1): the masked student pass and the teacher's patch logits.
    Term("distill", "mask_distill", _distill,
         lambda cfg: Passes(masked_image=True, teacher_views=1, teacher_outputs=("patch_logits",)),
         _distill_values, owns=("patch_decoder.", "distill_head.")),
    # SILC (docs/methods.md §2): every global view whole, the local crops, the teacher's pooled
    # logits of each global view.
    Term("local_global", "local_global", _local_global, _local_global_passes,
         _local_global_values, owns=("global_head.",)),
    Term("mlm", "text_mlm", _mlm, lambda cfg: Passes(masked_caption=True), _mlm_values,
         owns=("text_decoder.", "text.mask_embedding")),
)
_REGISTERED: list[Term] = []


def register_term(term: Term) -> None:
    """Add a term from outside the package (its ``config``, a frozen dataclass with a
    ``weight``, becomes the config section ``objective.<section>``). Register before the config
    is loaded, in every process. Its passes may use the views every objective has (one global
    view, the masked view, the caption, the masked caption, the teacher's outputs); more
    global views and local crops are drawn as ``objective.local_global`` says."""
    if term.section is None or term.config is None:
        raise ValueError("a registered term needs a config section name and its dataclass")
    params = getattr(term.config, "__dataclass_params__", None)
    if params is None or not params.frozen or "weight" not in {
            f.name for f in dataclasses.fields(term.config)}:
        raise ValueError(f"the config of term '{term.attr}' must be a frozen dataclass with a "
                         f"weight")
    taken = {t.attr for t in terms()} | {t.section for t in terms()}
    if (term.attr in taken or term.section in taken or hasattr(ObjectiveConfig, term.section)
            or hasattr(nn.Module, term.attr) or term.attr in ("terms", "weights")):
        raise ValueError(f"an objective term named '{term.attr}' or with section "
                         f"'{term.section}' exists already, or the name is taken")
    _REGISTERED.append(term)


def terms() -> tuple[Term, ...]:
    """Every known term, in summation order: the built-ins, then the registered ones."""
    return BUILTIN_TERMS + tuple(_REGISTERED)


def enabled_terms(cfg: ObjectiveConfig) -> tuple[Term, ...]:
    return tuple(t for t in terms() if t.enabled(cfg))


def passes_for(cfg: ObjectiveConfig) -> Passes:
    """The passes of one training forward of ``cfg``: the union of its terms'."""
    out = Passes()
    for term in enabled_terms(cfg):
        passes = term.passes(cfg)
        if term in _REGISTERED and (passes.full_views > 1 or passes.local_views):
            raise ValueError(f"term '{term.attr}' asks for {passes.full_views} global views and "
                             f"{passes.local_views} local crops; only objective.local_global "
                             f"draws more than one view")
        out = out | passes
    return out


def registered_sections() -> dict[str, type]:
    """Config sections of the registered terms, by name (``objectives/config.py`` adds them)."""
    return {t.section: t.config for t in _REGISTERED}
