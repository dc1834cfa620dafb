"""Local-to-global self-distillation (SILC, docs/methods.md §2): the student, seeing small local crops
(and the other global crop), matches the EMA teacher's output on each global crop."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaclip.objectives.config import LocalGlobalConfig
from megaclip.losses.centering import Centering, target_entropies, teacher_temperature


class LocalGlobalLoss(nn.Module):
    """Terms ``{"local_global"}``: the mean over (teacher global view t, student view s), s != t,
    of the cross-entropy from softmax((p_t - c) / tau_t) to softmax(p_s / tau_s), each a mean
    over the batch. Student views are the G global views (in the teacher's order) then the
    local ones, so a teacher view is never distilled into the student's copy of itself.

    Statistics: ``global_teacher_entropy`` and ``global_teacher_batch_entropy`` (collapse
    when near zero), ``global_teacher_temp``. The centre is updated once per optimiser step
    from the teacher logits of every global view on every rank (``Centering``)."""

    def __init__(self, cfg: LocalGlobalConfig, total_steps: int):
        super().__init__()
        self.cfg, self.total_steps = cfg, total_steps
        self.centering = Centering(cfg.prototypes, cfg.center_momentum)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                step: int) -> tuple[dict, dict]:
        """``student_logits`` (G + L, B, K); ``teacher_logits`` (G, B, K), view-major."""
        teacher = teacher_logits.detach().float()
        views_t, views_s = teacher.shape[0], student_logits.shape[0]
        temp = teacher_temperature(self.cfg, step, self.total_steps)
        with torch.no_grad():
            target = F.softmax((teacher - self.centering.center) / temp, dim=-1)
        log_student = F.log_softmax(student_logits.float() / self.cfg.student_temp, dim=-1)
        # (t, s) cross-entropies, each averaged over the batch; same-view pairs left out (by a
        # mask of fixed shape and a count known here: no output size depends on the data).
        ce = -torch.einsum("tbk,sbk->ts", target, log_student) / teacher.shape[1]
        keep = ~torch.eye(views_t, views_s, dtype=torch.bool, device=ce.device)
        loss = torch.where(keep, ce, 0.0).sum() / (views_t * views_s - min(views_t, views_s))
        with torch.no_grad():
            entropy, batch_entropy = target_entropies(target)
            self.centering.add(teacher)
        stats = {"global_teacher_entropy": entropy, "global_teacher_batch_entropy": batch_entropy,
                 "global_teacher_temp": torch.full((), temp, device=teacher.device)}
        return {"local_global": loss}, stats

    def end_step(self, applied: bool) -> None:
        self.centering.end_step(applied)
