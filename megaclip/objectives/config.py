"""The objective's section of the config: which losses run, their weights and settings, and the
named presets (docs/methods.md §1-3). Part of the one typed config tree (``config.py``); a
term registered from outside (``objectives/terms.py``) adds its own section."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class MaskConfig:
    """Image patch masks, drawn per sample in the data pipeline (docs/methods.md §1)."""
    ratio: float = 0.75
    strategy: str = "random"  # random | block (BEiT-style rectangles)
    block_min_patches: int = 16
    block_min_aspect: float = 0.3


@dataclass(frozen=True)
class PrototypeTargetsConfig:
    """A prototype head and DINO-style targets: what both distillation terms share."""
    prototypes: int = 8192
    head_hidden: int = 2048
    head_bottleneck: int = 256
    head_layers: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_warmup: float = 0.04  # linear from this to teacher_temp ...
    teacher_temp_warmup_fraction: float = 0.3  # ... over this fraction of train.steps
    center_momentum: float = 0.9
    freeze_prototypes_steps: int = 0  # the prototype layer does not learn for this many steps


@dataclass(frozen=True)
class MaskDistillConfig(PrototypeTargetsConfig):
    """Masked self-distillation: student decoder predicts the EMA teacher's soft codewords."""
    weight: float = 0.0  # 0: off
    start_at: float = 0.0  # the first step it runs: a step, or a fraction of train.steps in (0, 1)
    decoder_depth: int = 1
    decoder_heads: Optional[int] = None  # None: the vision tower's


@dataclass(frozen=True)
class LocalGlobalConfig(PrototypeTargetsConfig):
    """Local-to-global self-distillation (SILC, docs/methods.md §2): per sample, ``global_crops``
    views at the model's image size and ``local_crops`` at ``local_size``, drawn in the data
    pipeline; a DINO head on the pooled token of student and EMA teacher; cross-entropy from
    each teacher global view to every other student view. The contrastive loss reads each
    global view."""
    prototypes: int = 65536
    weight: float = 0.0  # 0: off (one view per sample, as in clip/maskclip)
    start_at: float = 0.0  # the first step it runs: a step, or a fraction of train.steps in (0, 1)
    global_crops: int = 2
    global_scale: tuple = (0.4, 1.0)
    local_crops: int = 8
    local_size: int = 96  # a multiple of the patch size; position embeddings are interpolated
    local_scale: tuple = (0.05, 0.4)
    # dino: flip, colour jitter, grayscale, blur, solarisation (DINO's recipe) | colour_safe:
    # flip, brightness/contrast jitter and blur only (for data whose captions name colours) |
    # none: flip only
    photometric: str = "dino"


@dataclass(frozen=True)
class TextMlmConfig:
    """BERT-style masked language modelling on the caption."""
    weight: float = 0.0  # 0: off
    start_at: float = 0.0  # the first step it runs: a step, or a fraction of train.steps in (0, 1)
    mask_ratio: float = 0.2
    mask_token_prob: float = 0.8  # of the chosen tokens: learnable [MASK] embedding ...
    random_token_prob: float = 0.1  # ... a random token; the rest stay unchanged
    decoder_depth: int = 4


@dataclass(frozen=True)
class TeacherConfig:
    """EMA teacher momentum: cosine from ``momentum`` to ``momentum_end`` over training; how its
    forward gets its parameters under ZeRO-3."""
    momentum: float = 0.996
    momentum_end: float = 1.0  # set equal to momentum for a fixed value
    # Under ZeRO-3, a teacher whose working copy (model dtype) is at most this many GiB is
    # gathered whole once per optimiser step, in one all-gather, and runs with no per-block
    # gathers (ViT-B/16: 0.19, ViT-L/14: 0.62); a larger one gathers block by block. 0: never.
    whole_copy_max_gib: float = 1.0


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which losses run and their weights; weighting happens in one place (objectives/loss.py).

    ``preset`` fills the values an experiment leaves unset (see OBJECTIVE_PRESETS)."""
    preset: str = "clip"  # clip | maskclip | maskclip_flip | silc | maskclip+silc | siglip2
    contrastive: str = "clip"  # clip | siglip
    contrastive_weight: float = 1.0
    contrastive_view: str = "full"  # full: a separate unmasked student pass | masked: FLIP-style
    local_loss: bool = True
    siglip_init_bias: float = -10.0
    mask: MaskConfig = field(default_factory=MaskConfig)
    mask_distill: MaskDistillConfig = field(default_factory=MaskDistillConfig)
    local_global: LocalGlobalConfig = field(default_factory=LocalGlobalConfig)
    text_mlm: TextMlmConfig = field(default_factory=TextMlmConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    @property
    def passes(self):
        """What one training forward runs (``objectives/passes.py``), from the enabled terms."""
        from megaclip.objectives.terms import passes_for
        return passes_for(self)

    @property
    def uses_masks(self) -> bool:
        """Image patch masks are drawn: a term reads the masked student pass."""
        return self.passes.masked_image

    @property
    def uses_multicrop(self) -> bool:
        """Several global views or local crops are drawn per sample."""
        passes = self.passes
        return passes.full_views > 1 or passes.local_views > 0

    @property
    def uses_teacher(self) -> bool:
        return self.passes.uses_teacher


def objective_config_class() -> type:
    """``ObjectiveConfig`` with the sections of the registered terms as further fields."""
    from megaclip.objectives.terms import registered_sections
    extra = registered_sections()
    return _with_sections(tuple(extra.items())) if extra else ObjectiveConfig


@functools.lru_cache(maxsize=None)
def _with_sections(sections: tuple) -> type:
    return dataclasses.make_dataclass(
        "ObjectiveConfig", [(name, cls, field(default_factory=cls)) for name, cls in sections],
        bases=(ObjectiveConfig,), frozen=True)


_MASKCLIP = {"contrastive_view": "full", "mask_distill": {"weight": 0.05},
             "text_mlm": {"weight": 0.05}}
# SILC: a fixed teacher momentum (a schedule that goes to 1 stops the teacher from learning from
# the image-text loss).
_SILC = {"local_global": {"weight": 1.0}, "teacher": {"momentum": 0.996, "momentum_end": 0.996}}

# Objective presets: config values applied beneath the experiment file and the overrides.
OBJECTIVE_PRESETS: dict[str, dict] = {
    "clip": {},
    # MaskCLIP as published: contrastive loss on a full-image student pass (docs/methods.md §1).
    "maskclip": _MASKCLIP,
    # Cheaper: the contrastive loss reads the masked student pass (FLIP-style), no full pass.
    "maskclip_flip": {**_MASKCLIP, "contrastive_view": "masked"},
    # SILC (docs/methods.md §2): contrastive on each global crop + local-to-global distillation.
    "silc": _SILC,
    # Both distillation terms from one teacher pass over the global crops; the masked view is
    # the first global crop (docs/methods.md §3).
    "maskclip+silc": {**_MASKCLIP, **_SILC},
    # SigLIP 2-style staging (docs/methods.md §3): the sigmoid loss alone for the first 80% of
    # training, at CLIP's cost; then SILC's local-to-global term and masked distillation (half
    # the patches hidden, as SigLIP 2's masked prediction) from one EMA teacher, initialised
    # from the student when they start. Weights 0.25 each (chosen). SigLIP 2's captioning
    # decoder (LocCa) is not part of megaclip.
    "siglip2": {"contrastive": "siglip", "contrastive_view": "full",
                "local_global": {"weight": 0.25, "start_at": 0.8},
                "mask_distill": {"weight": 0.25, "start_at": 0.8}, "mask": {"ratio": 0.5},
                "teacher": {"momentum": 0.996, "momentum_end": 0.996}},
}

PHOTOMETRIC = ("dino", "colour_safe", "none")


def validate_objective(obj: ObjectiveConfig, check: Callable[[bool, str], None]) -> None:
    check(obj.contrastive in ("clip", "siglip"),
          f"objective.contrastive must be 'clip' or 'siglip', got '{obj.contrastive}'")
    check(obj.contrastive_view in ("full", "masked"),
          f"objective.contrastive_view must be 'full' or 'masked', got '{obj.contrastive_view}'")
    check(obj.mask.strategy in ("random", "block"),
          f"objective.mask.strategy must be 'random' or 'block', got '{obj.mask.strategy}'")
    check(0 < obj.mask.ratio < 1, f"objective.mask.ratio must be in (0, 1), got {obj.mask.ratio}")
    check(0 < obj.mask.block_min_aspect <= 1, "objective.mask.block_min_aspect must be in (0, 1]")
    check(obj.mask.block_min_patches >= 1, "objective.mask.block_min_patches must be >= 1")
    check(0 < obj.text_mlm.mask_ratio < 1,
          f"objective.text_mlm.mask_ratio must be in (0, 1), got {obj.text_mlm.mask_ratio}")
    mlm = obj.text_mlm
    check(mlm.mask_token_prob >= 0 and mlm.random_token_prob >= 0
          and mlm.mask_token_prob + mlm.random_token_prob <= 1,
          "objective.text_mlm.mask_token_prob + random_token_prob must lie in [0, 1]")
    check(obj.mask_distill.weight >= 0 and obj.text_mlm.weight >= 0,
          "objective.mask_distill.weight and objective.text_mlm.weight must be >= 0")
    check(obj.mask_distill.prototypes > 0 and obj.mask_distill.decoder_depth > 0
          and obj.text_mlm.decoder_depth > 0, "prototypes and decoder depths must be positive")
    check(obj.teacher.whole_copy_max_gib >= 0,
          f"objective.teacher.whole_copy_max_gib must be >= 0, got {obj.teacher.whole_copy_max_gib}")
    check(0 <= obj.teacher.momentum <= obj.teacher.momentum_end <= 1,
          f"objective.teacher needs 0 <= momentum <= momentum_end <= 1, got momentum "
          f"{obj.teacher.momentum} and momentum_end {obj.teacher.momentum_end} (the silc presets "
          f"fix both at 0.996: set momentum_end with momentum)")
    lg = obj.local_global
    check(lg.weight >= 0, "objective.local_global.weight must be >= 0")
    check(not (obj.uses_multicrop and obj.contrastive_view == "masked"),
          "objective.contrastive_view=masked cannot be combined with objective.local_global: "
          "the contrastive loss reads every global crop, which the student sees whole anyway")
    check(obj.contrastive_view != "masked" or obj.passes.full_views == 0,
          "objective.contrastive_view=masked: the contrastive loss reads the masked pass, but "
          "another term needs the whole image too")
    check(lg.global_crops >= 1 and lg.local_crops >= 0
          and lg.global_crops + lg.local_crops >= 2,
          "objective.local_global needs global_crops >= 1, local_crops >= 0 and at least two "
          "views in all (a view is never distilled into itself)")
    for name in ("global_scale", "local_scale"):
        lo_hi = getattr(lg, name)
        check(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1] <= 1,
              f"objective.local_global.{name} must be [lo, hi] with 0 < lo <= hi <= 1, "
              f"got {list(lo_hi)}")
    check(lg.photometric in PHOTOMETRIC,
          f"objective.local_global.photometric must be one of {', '.join(PHOTOMETRIC)}, "
          f"got '{lg.photometric}'")
    check(lg.local_size > 0 and lg.prototypes > 0 and lg.head_layers >= 2,
          "objective.local_global needs local_size > 0, prototypes > 0 and head_layers >= 2")
    for name, section in (("mask_distill", obj.mask_distill), ("local_global", lg)):
        check(section.student_temp > 0 and section.teacher_temp > 0
              and section.teacher_temp_warmup > 0,
              f"objective.{name}: temperatures must be > 0")
        check(0 <= section.center_momentum < 1,
              f"objective.{name}.center_momentum must be in [0, 1)")
        check(section.freeze_prototypes_steps >= 0,
              f"objective.{name}.freeze_prototypes_steps must be >= 0")
