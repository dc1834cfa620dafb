"""Throughput, memory and the console/TensorBoard output of the training loop."""
from __future__ import annotations

import resource
import sys
import time
from typing import Optional

import torch


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


class MetricLogger:
    """Rank 0 writes TensorBoard scalars and one console line per log interval."""

    def __init__(self, log_dir: Optional[str], enabled: bool, total_steps: int):
        self.enabled, self.total = enabled, total_steps
        self.writer = None
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir)
        self.t_start, self.first_step = time.time(), None

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}{k}", v, step)

    def console(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.first_step is None:
            self.first_step, self.t_start = step, time.time()
        eta = (time.time() - self.t_start) / max(1, step - self.first_step) * (self.total - step)
        parts = [f"step {step}/{self.total}"]
        for k, v in values.items():
            parts.append(f"{k} {v:.4g}")
        parts.append(f"eta {eta / 60:.1f}m")
        print(" | ".join(parts), flush=True)

    def text(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True, file=sys.stdout)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
