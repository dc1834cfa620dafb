"""Throughput, memory and the console/TensorBoard/JSONL output of the training loop."""
from __future__ import annotations

import json
import os
import resource
import sys
from typing import Optional

import torch

# Dense bf16 tensor-core peak per GPU, TFLOP/s (vendor data sheets), matched in this order
# against torch.cuda.get_device_name(); train.peak_tflops overrides it for any other device.
PEAK_BF16_TFLOPS = (("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("GH200", 989.4),
                    ("H200", 989.4), ("H100", 989.4), ("H800", 989.4), ("B200", 2250.0),
                    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
                    ("L4", 121.0))


def peak_tflops(device: torch.device, dtype: torch.dtype, override: float = 0.0) -> Optional[float]:
    """The device's peak TFLOP/s for ``dtype`` when known (bf16 on the GPUs above), else None."""
    if override > 0:
        return override
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def memory_figures(device: torch.device) -> dict[str, float]:
    """``peak_mem_gib`` (allocated; peak RSS on the CPU) and, on a GPU, ``peak_reserved_gib``
    (what the caching allocator holds: what decides an out-of-memory error)."""
    out = {"peak_mem_gib": peak_memory_gib(device)}
    if device.type == "cuda":
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2 ** 30
    return out


def duration(seconds: float) -> str:
    """``42s``, ``12.5m`` or ``3.2h``."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.1f}m" if seconds < 90 * 60 else f"{seconds / 3600:.1f}h"


class MetricLogger:
    """Rank 0 writes TensorBoard scalars, one JSON line and one console line per log interval."""

    def __init__(self, log_dir: Optional[str], enabled: bool, total_steps: int,
                 jsonl_path: Optional[str] = None):
        self.enabled, self.total = enabled, total_steps
        self.writer = self.jsonl = None
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir)
        if enabled and jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            cut = False
            if os.path.isfile(jsonl_path) and os.path.getsize(jsonl_path):
                with open(jsonl_path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    cut = f.read(1) != b"\n"
            self.jsonl = open(jsonl_path, "a")
            if cut:  # a line cut by a crash stays alone (readers skip it), not glued to the next
                self.jsonl.write("\n")

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}{k}", v, step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **{prefix + k: v for k, v in values.items()}})
                             + "\n")
            self.jsonl.flush()

    def image(self, step: int, tag: str, grid) -> None:
        """A (3, H, W) picture in [0, 1] (TensorBoard's Images tab)."""
        if self.writer is not None:
            self.writer.add_image(tag, grid, step)

    def console(self, step: int, values: dict[str, float], eta_s: Optional[float] = None) -> None:
        """One line; the ETA is ``eta_s``, by default the measured step time (``step_time_s``)
        times the steps left."""
        if not self.enabled:
            return
        parts = [f"step {step}/{self.total}"]
        for k, v in values.items():
            parts.append(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4g}")  # counts whole
        if eta_s is None:
            eta_s = values.get("step_time_s", 0.0) * (self.total - step)
        parts.append("eta " + duration(eta_s))
        print(" | ".join(parts), flush=True)

    def text(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True, file=sys.stdout)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
