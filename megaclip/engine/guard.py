"""Non-finite steps: found on any rank, skipped on every rank, counted, and after too many in a
row the end of the run with its last good checkpoint kept.

DeepSpeed discards an optimiser step whose global gradient norm is not finite (the norm is
all-reduced, so every rank agrees). megaclip adds the loss: whether any term was non-finite on
any rank travels in the one small all-reduce each step already makes (the stop flag). A step is
good only if DeepSpeed applied it and no loss was non-finite; the EMA teacher and the
distillation centre move only after a good step. A step DeepSpeed applied although a loss was
non-finite is an error before anything is saved: the state can no longer be trusted.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from megaclip.distributed import all_reduce_sum
from megaclip.errors import FatalError

INJECT_ENV = "MEGACLIP_INJECT_NAN"  # tests only: "step:rank,..." gets NaN images


def nan_injections() -> set[tuple[int, int]]:
    """(step, rank) pairs whose batches the test hook turns into NaN (steps count from 1)."""
    spec = os.environ.get(INJECT_ENV, "").strip()
    return {tuple(int(x) for x in item.split(":")) for item in spec.split(",") if item}


class StepGuard:
    """Counts skipped steps; ``protected`` is the newest checkpoint saved before the current run
    of skipped steps began, which retention must keep."""

    def __init__(self, max_in_a_row: int, skipped: int = 0, protected: tuple = (),
                 in_a_row: int = 0):
        self.max_in_a_row, self.skipped, self.in_a_row = max_in_a_row, skipped, in_a_row
        self.protected = tuple(protected)

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped, "protected": list(self.protected),
                "skipped_in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = state.get("skipped_steps", 0)
        self.protected = tuple(state.get("protected", ()))
        self.in_a_row = state.get("skipped_in_a_row", 0)

    @classmethod
    def from_state(cls, max_in_a_row: int, state: dict) -> "StepGuard":
        guard = cls(max_in_a_row)
        guard.load_state_dict(state)
        return guard

    @staticmethod
    def local_flags(terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """1.0 for each term (sorted by name) that is not finite on this rank; on the device."""
        return torch.stack([(~torch.isfinite(terms[k].detach().float())).any().float()
                            for k in sorted(terms)])

    def judge(self, step: int, applied: bool, bad_terms: dict[str, float],
              latest: Callable[[], Optional[str]]) -> Optional[str]:
        """After the flags were summed over ranks: None for a good step, else the log line of a
        skipped one. Raises when the step must not count or too many were skipped in a row."""
        bad = {k: int(v) for k, v in bad_terms.items() if v > 0}
        if applied and not bad:
            self.in_a_row = 0
            return None
        latest_checkpoint = latest()
        if applied:  # DeepSpeed changed the state though a loss was not finite
            raise FatalError(f"step {step}: the optimiser step was applied although "
                             f"{', '.join(bad)} was not finite; stopping before anything is "
                             f"saved (last good checkpoint: {latest_checkpoint or 'none'})")
        if self.in_a_row == 0:
            self.protected = (latest_checkpoint,) if latest_checkpoint else ()
        self.skipped += 1
        self.in_a_row += 1
        what = (", ".join(f"{k} on {n} rank(s)" for k, n in bad.items()) if bad
                else "the gradient norm")
        line = (f"step {step} skipped on every rank: non-finite {what}; parameters, optimiser "
                f"state, EMA teacher and centre unchanged ({self.in_a_row} in a row, "
                f"{self.skipped} in all)")
        if self.in_a_row >= self.max_in_a_row:
            raise FatalError(f"{self.in_a_row} steps in a row were not finite (up to step "
                             f"{step}; train.max_skipped_steps_in_a_row); the last good "
                             f"checkpoint is kept: {self.protected[0] if self.protected else 'none'}")
        return line


def reduce_step_flags(stop: tuple[float, ...], term_flags: torch.Tensor,
                      device: torch.device) -> tuple[tuple[float, ...], list[float]]:
    """One all-reduce per step: how many ranks received a requeue signal and another stop signal
    (``StopSignal.flags``; after them, any other reason to stop, such as a data source that
    ran out), and per term how many ranks saw it non-finite.

    Its read-back is the one host synchronisation of an optimiser step that does not log, and
    it is there by necessity: whether to stop (a signal on any rank) and whether the step was
    skipped (``judge``, the log line, the teacher and centre left alone) are host decisions,
    and DeepSpeed's optimiser step makes the same wait anyway (it reads on the host whether
    the global gradient norm is finite, ``is_invalid_grad_norm``). Micro-steps within the step
    accumulate the flags on the device (``local_flags``) and read nothing."""
    packed = torch.cat([*(term_flags.new_full((1,), float(flag)) for flag in stop), term_flags])
    summed = all_reduce_sum(packed).tolist()
    return tuple(summed[:len(stop)]), summed[len(stop):]
