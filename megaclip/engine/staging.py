"""A staged objective applied to the training step by step (``start_at``,
``objectives/stages.py``; docs/methods.md §3).

Before a term starts, the model runs only the passes of the started terms, the parameters only
it trains (its decoder and head) are left exactly as they are (their optimiser group has a
learning rate of 0; they get no gradient), and the EMA teacher neither runs nor moves while no
started term reads it. At the start step the late parameters' Adam state starts afresh and the
teacher is initialised from the student as it is then, so the teacher equals the student
exactly at its first forward. Schedules that belong to a term count from its start: the
prototype layer's frozen steps, the teacher temperature's warm-up (``objectives/loss.py``) and
the teacher momentum's cosine, which spans the teacher's own steps (from its start to the end).
Without a late term every step is what it always was.
"""
from __future__ import annotations

from typing import Optional

from megaclip.engine.optim import restart_groups
from megaclip.teacher.ema import momentum_at

# The student's prototype heads, by the term that reads them and its config section.
HEADS = (("distill_head", "distill", "mask_distill"), ("global_head", "local_global",
                                                      "local_global"))


class StageSwitch:
    """``stages``: the objective's ``Stages``; ``group_starts``: the first step of each of the
    optimiser's parameter groups; ``module``: the model (the engine's module); ``teacher``:
    the ``EmaTeacher`` or None; ``cfg``: the objective's config section."""

    def __init__(self, stages, group_starts, module, optimizer, teacher, cfg):
        self.stages, self.module, self.optimizer, self.teacher = stages, module, optimizer, teacher
        self.group_starts = tuple(group_starts) or (0,) * len(optimizer.param_groups)
        self.cfg = cfg
        self.teacher_start = stages.teacher_start or 0

    def set_lr(self, lr: float, step: int) -> None:
        """``lr`` x the group's layer-decay scale (``optim.set_lr``) into every group that has
        started; 0 into the others."""
        for group, start in zip(self.optimizer.param_groups, self.group_starts):
            group["lr"] = lr * group.get("lr_scale", 1.0) if step >= start else 0.0

    def enter(self, step: int) -> Optional[str]:
        """Before the forward of ``step`` (counted from 0): the model's passes for it, the
        prototype layers frozen or not, and at a start the late groups' fresh Adam state and
        the teacher's initialisation. Returns the log line of a stage that begins here."""
        for head_name, attr, section in HEADS:
            head = getattr(self.module, head_name, None)
            if head is not None:
                first = (self.stages.starts.get(attr, 0)
                         + getattr(self.cfg, section).freeze_prototypes_steps)
                head.prototypes.frozen = step < first
        if not self.stages.staged:
            return None
        self.module.passes = self.stages.passes(step)
        line = None
        beginning = self.stages.beginning(step)
        if beginning:
            restart_groups(self.optimizer, [i for i, s in enumerate(self.group_starts)
                                            if s == step])
            line = (f"stage: {', '.join(beginning)} start at step {step} (logged from step "
                    f"{step + 1} on)")
        if (self.teacher is not None and not self.teacher.initialised
                and step >= self.teacher_start):
            self.teacher.init_from_student()
            line = (line or f"stage: step {step}") + (
                "; the EMA teacher is initialised from the student" if step == self.teacher_start
                else f"; the EMA teacher (from step {self.teacher_start}) is initialised from "
                     f"the student now: the checkpoint resumed from held none")
        return line

    def teacher_runs(self, step: int) -> bool:
        """Whether the teacher is in use at ``step`` (and so moves after it)."""
        return (self.teacher is not None and self.teacher.initialised
                and step >= self.teacher_start)

    def momentum(self, step: int) -> float:
        """The teacher's momentum after ``step``: its cosine spans the teacher's own steps."""
        t = self.cfg.teacher
        return momentum_at(step - self.teacher_start,
                           self.stages.total_steps - self.teacher_start,
                           t.momentum, t.momentum_end)
