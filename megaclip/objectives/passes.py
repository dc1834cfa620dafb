"""What one training forward of an objective runs: which tower passes over which views, how
many times, and which outputs of the EMA teacher its losses read (docs/methods.md §1-3).

Each term of an objective (``objectives/terms.py``) describes the passes it needs; the
objective's ``Passes`` is their union. It is the one description that the model's forward
(``models/towers.py``), the teacher's forward
(``teacher/build.py``) and the FLOPs count (``objectives/flops.py``) all read.
"""
from __future__ import annotations

from dataclasses import dataclass

TEACHER_OUTPUTS = ("patch_logits", "global_logits")


@dataclass(frozen=True)
class Passes:
    """The passes of one training forward.

    ``masked_image``: the image tower on the visible patches of the (first) global view;
    ``full_views``: whole global views through the image tower in one call (0: the contrastive
    loss reads the masked pass, FLIP-style); ``local_views``: local crops through the image tower
    in one more call; ``caption``: the text tower on the caption; ``masked_caption``: the text
    tower once more on the masked caption (MLM); ``teacher_views``: global views the EMA teacher
    sees (0: no teacher); ``teacher_outputs``: what its losses read of it (``patch_logits`` at
    every patch of the first view, ``global_logits`` of each view's pooled token)."""
    masked_image: bool = False
    full_views: int = 0
    local_views: int = 0
    caption: bool = False
    masked_caption: bool = False
    teacher_views: int = 0
    teacher_outputs: tuple = ()

    def __post_init__(self):
        unknown = set(self.teacher_outputs) - set(TEACHER_OUTPUTS)
        if unknown:
            raise ValueError(f"unknown teacher outputs {sorted(unknown)}; known: "
                             f"{', '.join(TEACHER_OUTPUTS)}")

    def __or__(self, other: "Passes") -> "Passes":
        """Both descriptions at once: a view seen by two terms is computed once."""
        return Passes(
            masked_image=self.masked_image or other.masked_image,
            full_views=max(self.full_views, other.full_views),
            local_views=max(self.local_views, other.local_views),
            caption=self.caption or other.caption,
            masked_caption=self.masked_caption or other.masked_caption,
            teacher_views=max(self.teacher_views, other.teacher_views),
            teacher_outputs=tuple(o for o in TEACHER_OUTPUTS
                                  if o in self.teacher_outputs or o in other.teacher_outputs))

    def tower_passes(self, tower: str) -> int:
        """How many inputs one training forward runs through ``tower`` (``visual`` or
        ``text``); the tower takes them all in one call (``models/blocks.py``)."""
        if tower == "visual":
            return int(self.masked_image) + int(self.full_views > 0) + int(self.local_views > 0)
        return int(self.caption) + int(self.masked_caption)

    @property
    def uses_teacher(self) -> bool:
        return self.teacher_views > 0
