"""Conversions of a consolidated megaclip state for downstream libraries, as pure functions of
state dicts and configs (no files, no model building).

* ``timm_vision``: the image trunk (student or EMA teacher) as the state dict of a timm
  ``VisionTransformer`` with ``num_classes=0``, and the ``timm.create_model`` call that builds it.
* ``safetensors_state``: the whole model (and optionally the teacher, under ``ema_teacher.``) as
  contiguous tensors, the form ``safetensors.torch.save_file`` takes.
"""
from __future__ import annotations

from typing import Optional

import torch

from megaclip.config import ModelConfig

STUDENT_TRUNK = "visual.trunk."
TEACHER_TRUNK = "trunk."
TEACHER_PREFIX = "ema_teacher."

# timm architectures our trunks match exactly (class token, no pre-norm, LayerNorm eps 1e-6, qkv
# bias, token pooling); any other size is the nearest one with its sizes overridden.
TIMM_ARCHS = {(16, 768, 12, 12): "vit_base_patch16_224", (16, 1024, 24, 16): "vit_large_patch16_224",
              (14, 1280, 32, 16): "vit_huge_patch14_224", (32, 768, 12, 12): "vit_base_patch32_224",
              (16, 384, 12, 6): "vit_small_patch16_224", (16, 192, 12, 3): "vit_tiny_patch16_224"}


def timm_create_kwargs(cfg: ModelConfig) -> tuple[str, dict]:
    """(timm architecture name, keyword arguments) for ``timm.create_model`` that build a ViT
    with exactly the keys and shapes of the trunk of the resolved model ``cfg``."""
    v = cfg.vision
    key = (v.patch_size, v.width, v.depth, v.heads)
    arch = TIMM_ARCHS.get(key, "vit_base_patch16_224")
    kwargs = {"num_classes": 0, "img_size": v.image_size, "dynamic_img_size": True}
    if key not in TIMM_ARCHS:
        kwargs.update(patch_size=v.patch_size, embed_dim=v.width, depth=v.depth,
                      num_heads=v.heads, mlp_ratio=v.mlp_ratio)
    return arch, kwargs


def timm_vision(state: dict[str, torch.Tensor], teacher: bool = False) -> dict[str, torch.Tensor]:
    """The trunk's parameters under timm's names: the student's ``visual.trunk.*`` of a
    consolidated model, or the teacher's ``trunk.*`` of a consolidated EMA teacher."""
    prefix = TEACHER_TRUNK if teacher else STUDENT_TRUNK
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"no '{prefix}*' tensors in the state ({len(state)} tensors)")
    return out


def safetensors_state(student: dict[str, torch.Tensor],
                      teacher: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """One flat dict of contiguous tensors: the model's names as they are, the EMA teacher's
    under ``ema_teacher.`` (safetensors refuses shared or strided storage)."""
    out = {k: v.detach().contiguous() for k, v in student.items()}
    for k, v in (teacher or {}).items():
        out[TEACHER_PREFIX + k] = v.detach().contiguous()
    return out


def split_safetensors_state(state: dict[str, torch.Tensor]
                            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The inverse of ``safetensors_state``: (model state, teacher state)."""
    teacher = {k[len(TEACHER_PREFIX):]: v for k, v in state.items() if k.startswith(TEACHER_PREFIX)}
    model = {k: v for k, v in state.items() if not k.startswith(TEACHER_PREFIX)}
    return model, teacher
