"""Building the two-tower model for an objective: which modules exist (from the objective's
``Passes``), created partitioned under ZeRO-3 (``zero3.py``), then initialised module by module
from a seed so that every world size gets the same weights."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megaclip.config import ModelConfig, ObjectiveConfig
from megaclip.models.decoders import MaskedPatchDecoder, TextMlmDecoder
from megaclip.models.heads import CosinePrototypes, PrototypeHead
from megaclip.models.text import TextTower
from megaclip.models.towers import TwoTower
from megaclip.models.vision import VisionTower
from megaclip.zero3 import check_dtype, gathered, is_partitioned, partitioned, set_leaf_blocks


def _head(cfg: ModelConfig, d) -> PrototypeHead:
    """A prototype head on the trunk's tokens from ``objective.mask_distill`` (patch tokens) or
    ``objective.local_global`` (the pooled token)."""
    return PrototypeHead(cfg.vision.width, d.head_hidden, d.head_bottleneck, d.prototypes,
                         d.head_layers)


def teacher_heads(cfg: ModelConfig, objective: ObjectiveConfig) -> dict[str, PrototypeHead]:
    """The heads the EMA teacher shares with the student, by the student's attribute name: one
    for each teacher output the objective's passes read."""
    outputs, heads = objective.passes.teacher_outputs, {}
    if "patch_logits" in outputs:
        heads["distill_head"] = _head(cfg, objective.mask_distill)
    if "global_logits" in outputs:
        heads["global_head"] = _head(cfg, objective.local_global)
    return heads


def _construct(cfg: ModelConfig, objective: ObjectiveConfig) -> TwoTower:
    v, t = cfg.vision, cfg.text
    passes = objective.passes
    mlm = passes.masked_caption
    visual = VisionTower(v.image_size, v.patch_size, v.width, v.depth, v.heads, v.mlp_ratio,
                         cfg.embed_dim, v.pre_norm, cfg.act, v.pool)
    text = TextTower(t.vocab_size, t.context_length, t.width, t.depth, t.heads, t.mlp_ratio,
                     cfg.embed_dim, mask_embedding=mlm, act=cfg.act, causal=t.causal,
                     pool=t.pool, proj_bias=t.proj_bias)
    bias = objective.siglip_init_bias if objective.contrastive == "siglip" else None
    init_scale = cfg.init_logit_scale if objective.contrastive == "clip" else 10.0
    extras: dict[str, nn.Module] = {}
    if "patch_logits" in passes.teacher_outputs:
        d = objective.mask_distill
        extras["patch_decoder"] = MaskedPatchDecoder(
            v.width, (v.image_size // v.patch_size) ** 2, d.decoder_depth,
            d.decoder_heads or v.heads, v.mlp_ratio)
    extras.update(teacher_heads(cfg, objective))
    if mlm:
        extras["text_decoder"] = TextMlmDecoder(t.width, objective.text_mlm.decoder_depth,
                                                t.heads, t.mlp_ratio, t.vocab_size)
    return TwoTower(visual, text, init_scale, cfg.max_logit_scale, bias,
                    passes=passes, **extras)


def build_model(cfg: ModelConfig, objective: ObjectiveConfig, seed: int,
                zero3_config: Optional[dict] = None, dtype: torch.dtype = torch.float32) -> TwoTower:
    """Build the model; with ``zero3_config`` every parameter is partitioned as it is created, so
    no rank ever holds the whole model. Weights are then initialised module by module from
    ``seed`` (identical for any world size)."""
    with partitioned(zero3_config, dtype):
        model = _construct(cfg, objective)
    if zero3_config is not None:  # without ZeRO-3 the DeepSpeed engine casts the model itself
        check_dtype(model, dtype)
    init_weights(model, seed)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.compile_blocks:
        model.compile_blocks()
    if zero3_config is not None and cfg.zero3_leaf_blocks:
        set_leaf_blocks(model)
    return model


def _init_module(name: str, module: nn.Module, gen: torch.Generator) -> None:
    def normal_(p, std, trunc=False):
        val = torch.randn(p.shape, generator=gen) * std
        if trunc:
            val = val.clamp(-2 * std, 2 * std)
        p.data.copy_(val)

    if isinstance(module, (nn.Linear, CosinePrototypes)):  # the prototypes: as the linear
        is_projection = name in ("visual.proj", "text.proj")
        normal_(module.weight, module.weight.shape[1] ** -0.5 if is_projection else 0.02, trunc=True)
        if getattr(module, "bias", None) is not None:
            module.bias.data.zero_()
    elif isinstance(module, nn.Conv2d):
        normal_(module.weight, 0.02, trunc=True)
        if module.bias is not None:
            module.bias.data.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.data.fill_(1.0)
        module.bias.data.zero_()
    elif isinstance(module, nn.Embedding):
        normal_(module.weight, 0.02)
    elif name == "visual.trunk":
        if module.cls_token is not None:  # none with attention pooling
            normal_(module.cls_token, 1e-6)
        normal_(module.pos_embed, 0.02, trunc=True)
    elif name == "visual.trunk.attn_pool":  # its query; the layers inside are Linear, LayerNorm
        normal_(module.latent, module.latent_dim ** -0.5, trunc=True)
    elif name == "text":
        normal_(module.positional_embedding, 0.01)
        if module.mask_embedding is not None:
            normal_(module.mask_embedding, 0.02)
    elif name == "patch_decoder":
        normal_(module.mask_token, 0.02)
        normal_(module.pos_embed, 0.02, trunc=True)


def init_weights(model: nn.Module, seed: int) -> None:
    """Initialise each module's own parameters, gathering them one module at a time under ZeRO-3
    (rank 0 draws, the others receive), so peak memory stays one module and every world size
    gets the same weights."""
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if not params or isinstance(module, TwoTower):
            continue  # the temperature and bias keep their constructor values
        split = is_partitioned(params)
        with gathered(params, modifier_rank=0), torch.no_grad():
            if not split or not dist.is_initialized() or dist.get_rank() == 0:
                _init_module(name, module, gen)
