"""When each term of an objective runs (docs/methods.md §3, staged objectives).

An auxiliary term (``objective.mask_distill``, ``text_mlm``, ``local_global``, a registered
one whose section has a ``start_at``) starts at ``start_at``: a step, or a fraction of
``train.steps`` in (0, 1); 0, the default, is the first step. SigLIP 2 adds its
self-distillation terms for the last 20% of training only, so most of the run costs what the
contrastive loss costs. Before a term's start, the objective is the one without it
(``objective_at``), and everything read from the objective's passes follows: the data pipeline
does not draw its views or masks, the model does not run its passes, the EMA teacher does not
run while no started term reads it, and the FLOPs count leaves them out. The contrastive term
always runs from the first step.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from megaclip.objectives.config import ObjectiveConfig
from megaclip.objectives.passes import Passes
from megaclip.objectives.terms import Term, enabled_terms, terms


def start_step(start_at: float, total_steps: int) -> int:
    """``start_at`` as a step: 0 and whole numbers are steps, a value in (0, 1) is that fraction
    of ``total_steps``, rounded to the nearest step."""
    if 0 < start_at < 1:
        return int(round(start_at * total_steps))
    return int(start_at)


def term_start(term: Term, cfg: ObjectiveConfig, total_steps: int) -> int:
    """The first step at which ``term`` runs (0 for a term without ``start_at``)."""
    settings = term.settings(cfg)
    return start_step(getattr(settings, "start_at", 0.0), total_steps)


def validate_starts(cfg: ObjectiveConfig, total_steps: int,
                    check: Callable[[bool, str], None]) -> None:
    """Each ``start_at`` is a step (a whole number >= 0) or a fraction in (0, 1), and an enabled
    term starts before the last step."""
    for term in terms():
        settings = term.settings(cfg)
        if settings is None or not hasattr(settings, "start_at"):
            continue
        at, key = settings.start_at, f"objective.{term.section}.start_at"
        check(at >= 0 and (at < 1 or float(at).is_integer()),
              f"{key} must be a step (a whole number >= 0) or a fraction of train.steps in "
              f"(0, 1), got {at:g}")
        if term.enabled(cfg):
            step = start_step(at, total_steps)
            check(step < total_steps,
                  f"{key}={at:g} is step {step}, but training ends at train.steps="
                  f"{total_steps}: the term would never run (set objective.{term.section}."
                  f"weight=0 to leave it out)")


def objective_at(cfg: ObjectiveConfig, step: int, total_steps: int) -> ObjectiveConfig:
    """``cfg`` as it stands at ``step``: every term that has not started switched off
    (weight 0). Its ``passes`` are what that step runs."""
    off = {}
    for term in enabled_terms(cfg):
        if term.section is not None and step < term_start(term, cfg, total_steps):
            off[term.section] = dataclasses.replace(term.settings(cfg), weight=0.0)
    return dataclasses.replace(cfg, **off) if off else cfg


class Stages:
    """The starts of the enabled terms of ``cfg`` over a run of ``total_steps``.

    ``starts``: the first step of each term, by its loss attribute (``contrastive``, ``distill``,
    ``local_global``, ``mlm``); ``boundaries``: the steps after 0 at which terms start;
    ``staged``: whether there are any; ``teacher_start``: the first step of a term that reads
    the EMA teacher (None without one)."""

    def __init__(self, cfg: ObjectiveConfig, total_steps: int):
        self.cfg, self.total_steps = cfg, total_steps
        enabled = enabled_terms(cfg)
        self.starts = {t.attr: term_start(t, cfg, total_steps) for t in enabled}
        self.sections = {t.attr: t.section or t.term_name(cfg) for t in enabled}
        self.owns = {t.attr: tuple(t.owns) for t in enabled}
        self.boundaries = sorted({s for s in self.starts.values() if s > 0})
        self.staged = bool(self.boundaries)
        reads_teacher = [self.starts[t.attr] for t in enabled if t.passes(cfg).uses_teacher]
        self.teacher_start = min(reads_teacher) if reads_teacher else None
        self._at: dict[int, ObjectiveConfig] = {}

    def later_params(self) -> dict[int, tuple[str, ...]]:
        """Name prefixes of the student's parameters that start training after step 0, by the
        step they start at (those of the terms that start then)."""
        out: dict[int, tuple[str, ...]] = {}
        for attr, s in self.starts.items():
            if s > 0 and self.owns[attr]:
                out[s] = out.get(s, ()) + self.owns[attr]
        return dict(sorted(out.items()))

    def stage_start(self, step: int) -> int:
        """The first step of the stage that ``step`` belongs to."""
        return max([0, *(b for b in self.boundaries if b <= step)])

    def at(self, step: int) -> ObjectiveConfig:
        """The objective at ``step`` (``objective_at``), one per stage."""
        first = self.stage_start(step)
        if first not in self._at:
            self._at[first] = objective_at(self.cfg, first, self.total_steps)
        return self._at[first]

    def passes(self, step: int) -> Passes:
        return self.at(step).passes

    def started(self, attr: str, step: int) -> bool:
        return step >= self.starts.get(attr, 0)

    def beginning(self, step: int) -> list[str]:
        """The config sections of the terms whose first step is ``step`` (> 0)."""
        return sorted(self.sections[a] for a, s in self.starts.items() if s == step and s > 0)

    def segments(self, first: int, last: int) -> list[tuple[int, int, ObjectiveConfig]]:
        """Steps [first, last) cut at the stage boundaries: (from, to, the objective there)."""
        cuts = [first, *(b for b in self.boundaries if first < b < last), last]
        return [(a, b, self.at(a)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]

    def describe(self) -> str:
        """One line for the log: which terms run from which step."""
        by_step: dict[int, list[str]] = {}
        for attr, s in self.starts.items():
            by_step.setdefault(s, []).append(self.sections[attr])
        parts = [f"{', '.join(sorted(names))} from step {s}"
                 + (f" ({s / self.total_steps:.0%} of train.steps)" if s else "")
                 for s, names in sorted(by_step.items())]
        teacher = (f"; the EMA teacher is initialised from the student at step "
                   f"{self.teacher_start}" if self.teacher_start else "")
        return "objective stages: " + "; ".join(parts) + teacher
