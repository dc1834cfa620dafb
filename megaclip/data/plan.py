"""What the data pipeline draws for each micro-batch of a staged objective (``start_at``,
``objectives/stages.py``): before a term starts, its views and masks are not drawn (no local
crops, no patch masks, no masked caption); from its first step on, they are.

The pipeline knows the step of every micro-batch it hands out: the loader's batches arrive in
order, one per micro-step, worker after worker (``TrainStream``), and the loader is built at a
known step. Every sample's crops and masks are drawn from its own seed, whatever the stage, so a
run resumed before a start, across it or after it draws what an uninterrupted run draws.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megaclip.data.masks import Masking, masking_for


@dataclass(frozen=True)
class DataStage:
    """From step ``first_step`` on: the masks to draw (None: none) and whether each sample gets
    SILC's multi-crop views instead of one crop."""
    first_step: int
    masking: Optional[Masking]
    multicrop: bool


@dataclass(frozen=True)
class DataPlan:
    """The stages (ascending, the first at step 0), the step of the loader's first micro-batch
    and the micro-batches per optimiser step."""
    stages: tuple
    first_step: int
    accum: int

    def step_of(self, batch: int) -> int:
        """The step of the loader's ``batch``-th micro-batch (0 = its first)."""
        return self.first_step + batch // self.accum

    def stage_of(self, batch: int) -> DataStage:
        step = self.step_of(batch)
        return [s for s in self.stages if s.first_step <= step][-1]

    def masks_text(self) -> bool:
        """Whether some stage masks captions (random replacement ids are needed then)."""
        return any(s.masking is not None and s.masking.text is not None for s in self.stages)


def data_plan(stages, image_size: int, patch_size: int, first_step: int,
              accum: int) -> Optional[DataPlan]:
    """The plan of ``stages`` (an ``objectives.stages.Stages``) for a loader whose first
    micro-batch belongs to ``first_step``; None when no term starts late (the pipeline then
    draws what the whole objective needs at every step, as always)."""
    if not stages.staged:
        return None
    return DataPlan(tuple(DataStage(b, masking_for(image_size, patch_size, stages.at(b)),
                                    stages.at(b).uses_multicrop)
                          for b in [0, *stages.boundaries]), first_step, accum)
