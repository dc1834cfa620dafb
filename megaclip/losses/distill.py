"""Masked self-distillation loss (MaskCLIP): cross-entropy from the teacher's centred, sharpened
soft codewords to the student's predicted distribution, on the masked patches only."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaclip.config import MaskDistillConfig
from megaclip.distributed import all_reduce_sum
from megaclip.models.vision import keep_tokens


def teacher_temperature(cfg: MaskDistillConfig, step: int, total_steps: int) -> float:
    """Linear warm-up from ``teacher_temp_warmup`` to ``teacher_temp``, then constant."""
    warm = int(cfg.teacher_temp_warmup_fraction * total_steps)
    if step >= warm:
        return cfg.teacher_temp
    return cfg.teacher_temp_warmup + (cfg.teacher_temp - cfg.teacher_temp_warmup) * step / warm


class MaskedDistillLoss(nn.Module):
    """Terms ``{"distill"}``; statistics ``teacher_entropy`` (mean entropy of the soft codewords,
    in nats) and ``teacher_batch_entropy`` (entropy of their batch mean: near zero means every
    patch gets the same codeword, i.e. collapse).

    The centre is the momentum average of the teacher's patch logits over the global batch:
    each micro-batch adds to a local sum, and ``end_step`` folds the sum over every rank and
    micro-batch into the centre once per optimiser step (one all-reduce), or drops it when the
    step was skipped.
    """

    def __init__(self, cfg: MaskDistillConfig, total_steps: int):
        super().__init__()
        self.cfg, self.total_steps = cfg, total_steps
        self.register_buffer("center", torch.zeros(1, 1, cfg.prototypes))
        self._pending: list[torch.Tensor] = []  # this step's sums of teacher logits, per micro
        self._pending_count = 0

    def forward(self, student_patch_logits: torch.Tensor, teacher_patch_logits: torch.Tensor,
                masked_index: torch.Tensor, step: int) -> tuple[dict, dict]:
        """``student_patch_logits`` (B, M, K) at the masked patches; ``teacher_patch_logits``
        (B, N, K) at every patch; ``masked_index`` (B, M) the masked patches' indices."""
        teacher = teacher_patch_logits.detach().float()
        temp = teacher_temperature(self.cfg, step, self.total_steps)
        with torch.no_grad():
            target = F.softmax((keep_tokens(teacher, masked_index) - self.center) / temp, dim=-1)
        log_student = F.log_softmax(student_patch_logits.float() / self.cfg.student_temp, dim=-1)
        loss = -(target * log_student).sum(-1).mean()
        with torch.no_grad():
            entropy = -(target * target.clamp_min(1e-12).log()).sum(-1).mean()
            mean = target.mean(dim=(0, 1))
            batch_entropy = -(mean * mean.clamp_min(1e-12).log()).sum()
            self._pending.append(teacher.sum(dim=(0, 1), keepdim=True))
            self._pending_count += teacher.shape[0] * teacher.shape[1]
        stats = {"teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy,
                 "teacher_temp": torch.tensor(temp, device=teacher.device)}
        return {"distill": loss}, stats

    @torch.no_grad()
    def end_step(self, applied: bool) -> None:
        """After the optimiser step: update the centre from every rank's micro-batches of this
        step (all ranks call it, with the same ``applied``), or forget them."""
        pending, count = self._pending, self._pending_count
        self._pending, self._pending_count = [], 0
        if not applied or not pending:
            return
        packed = torch.cat([torch.stack(pending).sum(0).reshape(-1),
                            torch.tensor([float(count)], device=pending[0].device)])
        packed = all_reduce_sum(packed)
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(packed[:-1].reshape(self.center.shape) / packed[-1], alpha=1 - m)
