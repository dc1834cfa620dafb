"""megaclip/train.py with a toy objective term registered from outside the package: a loss
module, its config section and its pass description, nothing else. The term pulls each image's
feature towards its caption's (1 - cosine), reading the outputs of the passes the contrastive
term runs anyway; its loss module counts the optimiser steps it took part in (a buffer, saved
in every checkpoint with the objective's state)."""
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from megaclip.objectives.passes import Passes  # noqa: E402
from megaclip.objectives.terms import Term, register_term  # noqa: E402


@dataclass(frozen=True)
class AlignConfig:
    """The config section ``objective.align``."""
    weight: float = 0.0  # 0: off


class AlignLoss(nn.Module):
    def __init__(self, cfg: AlignConfig, total_steps: int):
        super().__init__()
        self.register_buffer("steps_applied", torch.zeros(1))

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> dict:
        return {"align": (1 - (image_features * text_features).sum(-1)).mean()}

    def end_step(self, applied: bool) -> None:
        if applied:
            self.steps_applied += 1


register_term(Term(
    attr="align", section="align", config=AlignConfig,
    build=lambda cfg, total_steps: AlignLoss(cfg.align, total_steps),
    passes=lambda cfg: Passes(full_views=1, caption=True),
    compute=lambda loss, outputs, batch, teacher_out, step: (
        loss(outputs["image_features"], outputs["text_features"]), {})))

if __name__ == "__main__":
    from megaclip.errors import run_cli
    from megaclip.train import main
    run_cli(main)
