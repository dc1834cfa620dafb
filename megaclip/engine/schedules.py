"""Schedules as plain functions of the step."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, peak: float, warmup: int, floor: float = 0.0) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup`` steps, then cosine down to ``floor``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
