"""Masked self-distillation loss (MaskCLIP): cross-entropy from the teacher's centred, sharpened
soft codewords to the student's predicted distribution, on the masked patches only."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaclip.config import MaskDistillConfig
from megaclip.losses.centering import Centering, target_entropies, teacher_temperature
from megaclip.models.vision import tokens_at

__all__ = ["MaskedDistillLoss", "teacher_temperature"]


class MaskedDistillLoss(nn.Module):
    """Terms ``{"distill"}``; statistics ``teacher_entropy`` (mean entropy of the soft codewords,
    in nats) and ``teacher_batch_entropy`` (entropy of their batch mean: near zero means every
    patch gets the same codeword, i.e. collapse).

    The centre is the momentum average of the teacher's patch logits over the global batch,
    updated once per optimiser step (``Centering``).
    """

    def __init__(self, cfg: MaskDistillConfig, total_steps: int):
        super().__init__()
        self.cfg, self.total_steps = cfg, total_steps
        self.centering = Centering(cfg.prototypes, cfg.center_momentum)

    def forward(self, student_patch_logits: torch.Tensor, teacher_patch_logits: torch.Tensor,
                masked_index: torch.Tensor, step: int) -> tuple[dict, dict]:
        """``student_patch_logits`` (B, M, K) at the masked patches; ``teacher_patch_logits``
        (B, N, K) at every patch; ``masked_index`` (B, M) the masked patches' indices."""
        teacher = teacher_patch_logits.detach().float()
        temp = teacher_temperature(self.cfg, step, self.total_steps)
        with torch.no_grad():
            center = self.centering.center
            target = F.softmax((tokens_at(teacher, masked_index) - center) / temp, dim=-1)
        log_student = F.log_softmax(student_patch_logits.float() / self.cfg.student_temp, dim=-1)
        loss = -(target * log_student).sum(-1).mean()
        with torch.no_grad():
            entropy, batch_entropy = target_entropies(target)
            self.centering.add(teacher)
        stats = {"teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy,
                 "teacher_temp": torch.full((), temp, device=teacher.device)}  # no host copy
        return {"distill": loss}, stats

    def end_step(self, applied: bool) -> None:
        self.centering.end_step(applied)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints written before the centring had its own module hold ``center`` (1, 1, K)."""
        old = state_dict.pop(prefix + "center", None)
        if old is not None and prefix + "centering.center" not in state_dict:
            state_dict[prefix + "centering.center"] = old.reshape(-1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
