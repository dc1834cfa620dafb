"""Analytic FLOP count of a training step per sample (matmuls only, multiply-add = 2 FLOPs)."""
from __future__ import annotations

from megaclip.config import ModelConfig, ObjectiveConfig
from megaclip.data.masks import num_masked


def transformer_flops(tokens: int, width: int, depth: int, mlp_ratio: float) -> float:
    per_layer = 2 * tokens * (4 * width * width + 2 * mlp_ratio * width * width)  # qkv, proj, mlp
    per_layer += 2 * 2 * tokens * tokens * width  # q @ k^T and attn @ v
    return depth * per_layer


def vision_flops(cfg: ModelConfig, patches_kept: int, image_size: int = 0) -> float:
    v = cfg.vision
    patches = ((image_size or v.image_size) // v.patch_size) ** 2
    out = 2 * patches * 3 * v.patch_size ** 2 * v.width  # patch embedding (all patches)
    return out + transformer_flops(patches_kept + 1, v.width, v.depth, v.mlp_ratio)


def text_flops(cfg: ModelConfig) -> float:
    t = cfg.text
    return transformer_flops(t.context_length, t.width, t.depth, t.mlp_ratio)


def forward_flops_per_sample(cfg: ModelConfig) -> float:
    """Forward FLOPs of one image-text pair through the two towers (resolved model config)."""
    v = cfg.vision
    patches = (v.image_size // v.patch_size) ** 2
    return float(vision_flops(cfg, patches) + 2 * v.width * cfg.embed_dim
                 + text_flops(cfg) + 2 * cfg.text.width * cfg.embed_dim)


def head_flops(cfg: ModelConfig, obj: ObjectiveConfig, tokens: int, d=None) -> float:
    """A prototype head (``d``: its config section, MaskCLIP's by default) on ``tokens``."""
    d = d or obj.mask_distill
    dims = [cfg.vision.width] + [d.head_hidden] * (d.head_layers - 1) + [d.head_bottleneck]
    mlp = sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))
    return tokens * (mlp + 2 * d.head_bottleneck * d.prototypes)


def train_flops_per_sample(cfg: ModelConfig, obj: ObjectiveConfig | None = None) -> float:
    """Forward + backward (3x forward) of every trained pass the objective's ``Passes`` lists,
    plus the teacher's forward. Recomputation by activation checkpointing is not counted (model
    FLOPs, not hardware)."""
    if obj is None:
        return 3.0 * forward_flops_per_sample(cfg)
    passes = obj.passes
    v, t = cfg.vision, cfg.text
    patches = (v.image_size // v.patch_size) ** 2
    masked = num_masked(patches, obj.mask.ratio)
    total = 0.0
    if passes.caption:
        total += 3.0 * (text_flops(cfg) + 2 * t.width * cfg.embed_dim)
    total += 3.0 * max(1, passes.full_views) * 2 * v.width * cfg.embed_dim  # image projections
    if passes.masked_image:
        total += 3.0 * vision_flops(cfg, patches - masked)
    total += 3.0 * passes.full_views * vision_flops(cfg, patches)  # every global view, whole
    if "patch_logits" in passes.teacher_outputs:  # MaskCLIP's decoder and heads
        total += 3.0 * transformer_flops(patches + 1, v.width, obj.mask_distill.decoder_depth,
                                         v.mlp_ratio)
        total += 3.0 * head_flops(cfg, obj, masked)
        total += head_flops(cfg, obj, patches)  # teacher head, no grad
    total += passes.teacher_views * vision_flops(cfg, patches)  # the teacher's trunk, no grad
    if "global_logits" in passes.teacher_outputs:  # SILC's local crops and heads
        lg = obj.local_global
        views = passes.full_views
        local_patches = (lg.local_size // v.patch_size) ** 2
        total += 3.0 * passes.local_views * vision_flops(cfg, local_patches, lg.local_size)
        total += 3.0 * head_flops(cfg, obj, views + passes.local_views, lg)
        total += head_flops(cfg, obj, views, lg)  # teacher head
    if passes.masked_caption:
        L = t.context_length
        total += 3.0 * text_flops(cfg)
        total += 3.0 * transformer_flops(L, t.width, obj.text_mlm.decoder_depth, t.mlp_ratio)
        total += 3.0 * 2 * max(1, round(obj.text_mlm.mask_ratio * L)) * t.width * t.vocab_size
    return float(total)


def steps_flops_per_sample(cfg: ModelConfig, stages, first: int, last: int) -> float:
    """The train FLOPs per sample of steps [first, last) summed, each step counted with the
    terms that run in it (``stages``: the objective's ``Stages``; a term that starts late costs
    nothing before its start)."""
    return float(sum((b - a) * train_flops_per_sample(cfg, obj)
                     for a, b, obj in stages.segments(first, last)))


def mean_flops_per_sample(cfg: ModelConfig, stages, first: int, last: int) -> float:
    """The mean train FLOPs per sample of the steps [first, last) (of one stage: its FLOPs)."""
    segments = stages.segments(first, max(last, first + 1))
    if len(segments) == 1:
        return train_flops_per_sample(cfg, segments[0][2])
    return steps_flops_per_sample(cfg, stages, first, last) / (last - first)
