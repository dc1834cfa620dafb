"""The objective's loss: the enabled terms' loss modules and the one place where their values
are weighted (docs/methods.md §1-3)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megaclip.objectives.config import ObjectiveConfig
from megaclip.objectives.stages import Stages
from megaclip.objectives.terms import enabled_terms


class ObjectiveLoss(nn.Module):
    """The configured loss modules (``objectives/terms.py``), each under its term's attribute
    (``contrastive``, ``distill``, ``local_global``, ``mlm``; the buffers they own, such as the
    distillation centres, are its state dict), and their weights.

    ``forward`` returns (terms, statistics): terms enter the total, statistics are only logged.
    A term that starts late (``start_at``, ``objectives/stages.py``) is left out before its
    first step; from then on its step counts from its start, and its schedules (the teacher
    temperature's warm-up) span its own steps, from its start to the end of training.
    """

    def __init__(self, cfg: ObjectiveConfig, total_steps: int):
        super().__init__()
        self.terms = enabled_terms(cfg)
        self.weights = {t.term_name(cfg): t.weight(cfg) for t in self.terms}
        self.names = {t.attr: t.term_name(cfg) for t in self.terms}  # by attribute
        self.starts = Stages(cfg, total_steps).starts  # by attribute
        for term in self.terms:
            self.add_module(term.attr, term.build(cfg, total_steps - self.starts[term.attr]))

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                teacher_out: Optional[dict[str, torch.Tensor]] = None, step: int = 0,
                term_outputs: Optional[dict[str, dict[str, torch.Tensor]]] = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``outputs``: the model's; ``teacher_out``: the EMA teacher's (``patch_logits``,
        ``global_logits``) when a term needs it; ``term_outputs``: outputs that the term of that
        attribute reads instead of ``outputs`` (the contrastive term's accumulated features,
        ``engine/accum.py``)."""
        terms: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        for term in self.terms:
            start = self.starts[term.attr]
            if step < start:
                continue
            out = (term_outputs or {}).get(term.attr, outputs)
            t, s = term.compute(getattr(self, term.attr), out, batch, teacher_out, step - start)
            terms.update(t)
            stats.update(s)
        return terms, stats

    def end_step(self, applied: bool) -> None:
        """Once per optimiser step, on every rank: statistics gathered over its micro-batches
        (the distillation centres) are folded in if the step was applied, dropped if skipped."""
        for term in self.terms:
            loss = getattr(self, term.attr)
            if hasattr(loss, "end_step"):
                loss.end_step(applied)

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[k] * v for k, v in terms.items())
