"""The teacher centre of DINO-style distillation: a momentum average of the teacher's logits
over the global batch, subtracted before sharpening so that no prototype takes over."""
from __future__ import annotations

import torch
from torch import nn

from megaclip.distributed import all_reduce_sum


def teacher_temperature(cfg, step: int, total_steps: int) -> float:
    """Linear warm-up from ``cfg.teacher_temp_warmup`` to ``cfg.teacher_temp`` over
    ``cfg.teacher_temp_warmup_fraction`` of training, then constant."""
    warm = int(cfg.teacher_temp_warmup_fraction * total_steps)
    if step >= warm:
        return cfg.teacher_temp
    return cfg.teacher_temp_warmup + (cfg.teacher_temp - cfg.teacher_temp_warmup) * step / warm


def target_entropies(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean entropy of the soft targets (..., K), entropy of their mean over all rows): the
    second near zero means every row gets the same prototype, i.e. collapse."""
    entropy = -(target * target.clamp_min(1e-12).log()).sum(-1).mean()
    mean = target.reshape(-1, target.shape[-1]).mean(0)
    return entropy, -(mean * mean.clamp_min(1e-12).log()).sum()


class Centering(nn.Module):
    """``center`` (K,), updated once per optimiser step: each micro-batch ``add``s its teacher
    logits to a local sum, and ``end_step`` folds the sum over every rank and micro-batch into
    the centre (one all-reduce), or drops it when the step was skipped. With gradient
    accumulation the momentum is therefore per optimiser step, as in DINO."""

    def __init__(self, size: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(size))
        self._sum: torch.Tensor | None = None
        self._count = 0

    @torch.no_grad()
    def add(self, teacher_logits: torch.Tensor) -> None:
        rows = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
        total = rows.sum(0)
        self._sum = total if self._sum is None else self._sum + total
        self._count += rows.shape[0]

    @torch.no_grad()
    def end_step(self, applied: bool) -> None:
        """All ranks call it once per optimiser step with the same ``applied``."""
        total, count = self._sum, self._count
        self._sum, self._count = None, 0
        if not applied or total is None:
            return
        packed = all_reduce_sum(torch.cat([total, total.new_full((1,), float(count))]))
        m = self.momentum
        self.center.mul_(m).add_(packed[:-1] / packed[-1], alpha=1 - m)
