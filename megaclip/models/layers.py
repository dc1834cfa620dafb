"""Where each parameter sits in its tower, for locking a tower (LiT) and for layer-wise learning
rates (BEiT/EVA layer decay).

A tower's parts, in the order its input goes through them: 0 the embeddings (patch embedding,
class token, position embeddings and CLIP's pre-norm; token and position embeddings and the MLM
[MASK] embedding), 1..depth the blocks, depth + 1 the final norm, depth + 2 the projection.
Parameters outside the towers (logit scale and bias, MaskCLIP's and SILC's heads and decoders)
have no part.
"""
from __future__ import annotations

import re
from typing import Optional

from torch import nn

from megaclip.config import ModelConfig, ObjectiveConfig
from megaclip.errors import UserError

_EMBEDDINGS = {"image": ("visual.trunk.cls_token", "visual.trunk.pos_embed",
                         "visual.trunk.patch_embed.", "visual.trunk.norm_pre."),
               "text": ("text.token_embedding.", "text.positional_embedding",
                        "text.mask_embedding")}
_BLOCKS = {"image": re.compile(r"^visual\.trunk\.blocks\.(\d+)\."),
           "text": re.compile(r"^text\.blocks\.(\d+)\.")}
_FINAL_NORM = {"image": "visual.trunk.norm.", "text": "text.ln_final."}
# SigLIP's attention pooling (model.vision.pool=map) reads the final norm's tokens, as a projection
_PROJECTION = {"image": ("visual.proj.", "visual.trunk.attn_pool."), "text": ("text.proj.",)}


def depths(cfg: ModelConfig) -> dict[str, int]:
    """The number of blocks of each tower of a resolved model config."""
    return {"image": cfg.vision.depth, "text": cfg.text.depth}


def tower_part(name: str, depth: dict[str, int]) -> Optional[tuple[str, int]]:
    """(tower, part) of a model parameter name, or None outside the towers."""
    for tower in ("image", "text"):
        if name.startswith(_EMBEDDINGS[tower]):
            return tower, 0
        found = _BLOCKS[tower].match(name)
        if found:
            return tower, int(found.group(1)) + 1
        if name.startswith(_FINAL_NORM[tower]):
            return tower, depth[tower] + 1
        if name.startswith(_PROJECTION[tower]):
            return tower, depth[tower] + 2
        if name.startswith("visual." if tower == "image" else "text."):
            raise AssertionError(f"parameter {name} has no place in the {tower} tower")
    return None


def lock_group(part: int, depth: int) -> int:
    """open_clip's lock groups (``VisionTransformer.lock``, ``lock_text_tower``): the embeddings,
    each block but the last, the last block with the final norm, the projection: depth + 2
    groups, numbered from 0."""
    return min(part, depth) if part <= depth + 1 else depth + 1


def layer_scale(part: Optional[int], depth: int, decay: float) -> float:
    """BEiT's layer decay: the embeddings decay^(depth + 1), block i decay^(depth - i), the final
    norm and the projection (and everything outside the towers, ``part`` None) 1."""
    if part is None or decay == 1.0:
        return 1.0
    return decay ** max(0, depth + 1 - part)


def locked_groups(cfg: ModelConfig) -> dict[str, int]:
    """How many of each tower's lock groups are locked (0: none), counted from its input."""
    out = {}
    for tower, (lock, unlocked) in {
            "image": (cfg.lock_image, cfg.lock_image_unlocked_groups),
            "text": (cfg.lock_text, cfg.lock_text_unlocked_layers)}.items():
        groups = depths(cfg)[tower] + 2
        out[tower] = max(0, groups - unlocked) if lock else 0
    return out


def lock_towers(model: nn.Module, cfg: ModelConfig) -> dict[str, int]:
    """``requires_grad`` off for the locked groups of each tower (before the optimiser and the
    DeepSpeed engine are built, so the optimiser never holds them). Returns the number of
    parameter tensors locked per tower."""
    locked, depth = locked_groups(cfg), depths(cfg)
    counts = {"image": 0, "text": 0}
    for name, p in model.named_parameters():
        where = tower_part(name, depth)
        if where is None:
            continue
        tower, part = where
        if lock_group(part, depth[tower]) < locked[tower]:
            p.requires_grad_(False)
            counts[tower] += 1
    return counts


def check_locks(cfg: ModelConfig, objective: ObjectiveConfig) -> None:
    """A locked image trunk cannot be the student of the EMA teacher (resolved model config).

    The teacher follows the student's image trunk through DeepSpeed's fp32 masters, which a
    parameter outside the optimiser does not have, and distilling into a trunk that cannot move
    trains nothing of it: ``lock_image`` with an objective that uses the teacher
    (``mask_distill``, ``local_global``) is refused unless every group of the trunk is unlocked
    (the projection is not the teacher's, so it alone does not count)."""
    if not objective.uses_teacher or not cfg.lock_image:
        return
    trunk_groups = cfg.vision.depth + 1  # embeddings, blocks (last with the final norm)
    if cfg.lock_image_unlocked_groups < trunk_groups + 1:
        raise UserError(
            f"model.lock_image=true with objective '{objective.preset}': its EMA teacher follows "
            f"the image trunk, which a locked tower keeps still (and DeepSpeed keeps no fp32 "
            f"master of a locked parameter for the teacher to read). Lock the text tower "
            f"instead, use objective.preset=clip or siglip for LiT, or unlock the whole trunk "
            f"(model.lock_image_unlocked_groups={trunk_groups + 1})")
