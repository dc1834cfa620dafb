"""Model presets and the builder that creates parameters under ``deepspeed.zero.Init``."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
from torch import nn

from megaclip.config import ModelConfig, ObjectiveConfig
from megaclip.errors import UserError
from megaclip.models.decoders import MaskedPatchDecoder, TextMlmDecoder
from megaclip.models.heads import CosinePrototypes, PrototypeHead
from megaclip.models.text import TextTower
from megaclip.models.towers import TwoTower
from megaclip.models.vision import VisionTower, build_trunk

PRESETS: dict[str, dict] = {
    # For tests and the CPU demo.
    "tiny": dict(embed_dim=128,
                 vision=dict(image_size=64, patch_size=8, width=128, depth=4, heads=4, mlp_ratio=4.0),
                 text=dict(context_length=32, width=128, depth=3, heads=4)),
    "vit_b16": dict(embed_dim=512,
                    vision=dict(image_size=224, patch_size=16, width=768, depth=12, heads=12, mlp_ratio=4.0),
                    text=dict(context_length=77, width=512, depth=12, heads=8)),
    "vit_l14": dict(embed_dim=768,
                    vision=dict(image_size=224, patch_size=14, width=1024, depth=24, heads=16, mlp_ratio=4.0),
                    text=dict(context_length=77, width=768, depth=12, heads=12)),
}


def _preset(cfg: ModelConfig) -> dict:
    if cfg.preset not in PRESETS:
        raise UserError(f"unknown model.preset '{cfg.preset}'; presets: {', '.join(PRESETS)}")
    return PRESETS[cfg.preset]


def context_length(cfg: ModelConfig) -> int:
    """The text context length (needed to build the tokenizer before the config is resolved)."""
    return cfg.text.context_length or _preset(cfg)["text"]["context_length"]


def resolve_model_config(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    """Fill every ``None`` from the preset and the vocabulary size from the tokenizer."""
    preset = _preset(cfg)

    def fill(section, values):
        return dataclasses.replace(section, **{k: v for k, v in values.items()
                                               if getattr(section, k) is None})

    vision = fill(cfg.vision, preset["vision"])
    text = fill(cfg.text, preset["text"])
    if text.vocab_size and vocab_size and text.vocab_size != vocab_size:
        raise UserError(f"model.text.vocab_size is {text.vocab_size} but the tokenizer has "
                        f"{vocab_size} pieces; leave it at 0 to take the tokenizer's")
    text = dataclasses.replace(text, vocab_size=text.vocab_size or vocab_size)
    if text.vocab_size <= 0:
        raise UserError("model.text.vocab_size is unknown: set data.tokenizer")
    if vision.image_size % vision.patch_size:
        raise UserError(f"model.vision.image_size {vision.image_size} is not a multiple of "
                        f"patch_size {vision.patch_size}")
    for name, sec in (("vision", vision), ("text", text)):
        if sec.width % sec.heads:
            raise UserError(f"model.{name}.width {sec.width} is not divisible by heads {sec.heads}")
    return dataclasses.replace(cfg, vision=vision, text=text,
                               embed_dim=cfg.embed_dim or preset["embed_dim"])


def _head(cfg: ModelConfig, d) -> PrototypeHead:
    """A prototype head on the trunk's tokens from ``objective.mask_distill`` (patch tokens) or
    ``objective.local_global`` (the pooled token)."""
    return PrototypeHead(cfg.vision.width, d.head_hidden, d.head_bottleneck, d.prototypes,
                         d.head_layers)


def _teacher_heads(cfg: ModelConfig, objective: ObjectiveConfig) -> dict[str, PrototypeHead]:
    """The heads the EMA teacher shares with the student, by the student's attribute name."""
    heads = {}
    if objective.mask_distill.weight > 0:
        heads["distill_head"] = _head(cfg, objective.mask_distill)
    if objective.local_global.weight > 0:
        heads["global_head"] = _head(cfg, objective.local_global)
    return heads


def check_multicrop(cfg: ModelConfig, objective: ObjectiveConfig) -> None:
    """The local crops must tile into whole patches (resolved model config)."""
    lg = objective.local_global
    if objective.uses_multicrop and lg.local_crops and lg.local_size % cfg.vision.patch_size:
        raise UserError(f"objective.local_global.local_size {lg.local_size} is not a multiple of "
                        f"model.vision.patch_size {cfg.vision.patch_size}")


def _construct(cfg: ModelConfig, objective: ObjectiveConfig) -> TwoTower:
    v, t = cfg.vision, cfg.text
    mlm = objective.text_mlm.weight > 0
    visual = VisionTower(v.image_size, v.patch_size, v.width, v.depth, v.heads, v.mlp_ratio,
                         cfg.embed_dim)
    text = TextTower(t.vocab_size, t.context_length, t.width, t.depth, t.heads, t.mlp_ratio,
                     cfg.embed_dim, mask_embedding=mlm)
    bias = objective.siglip_init_bias if objective.contrastive == "siglip" else None
    init_scale = cfg.init_logit_scale if objective.contrastive == "clip" else 10.0
    extras: dict[str, nn.Module] = {}
    if objective.mask_distill.weight > 0:
        d = objective.mask_distill
        extras["patch_decoder"] = MaskedPatchDecoder(
            v.width, (v.image_size // v.patch_size) ** 2, d.decoder_depth,
            d.decoder_heads or v.heads, v.mlp_ratio)
    extras.update(_teacher_heads(cfg, objective))
    if mlm:
        extras["text_decoder"] = TextMlmDecoder(t.width, objective.text_mlm.decoder_depth,
                                                t.heads, t.mlp_ratio, t.vocab_size)
    return TwoTower(visual, text, init_scale, cfg.max_logit_scale, bias,
                    contrastive_view=objective.contrastive_view, **extras)


def build_teacher_modules(cfg: ModelConfig, objective: ObjectiveConfig,
                          zero3_config: Optional[dict] = None, dtype: torch.dtype = torch.float32
                          ) -> tuple[nn.Module, dict[str, nn.Module]]:
    """(image trunk, heads by the student's attribute name: ``distill_head`` for MaskCLIP,
    ``global_head`` for SILC) with the student's architecture, created in the student's order
    and partitioned exactly like the student's under ZeRO-3. Their values are copied from the
    student, not drawn."""
    v = cfg.vision
    with _partitioned(zero3_config, dtype):
        trunk = build_trunk(v.image_size, v.patch_size, v.width, v.depth, v.heads, v.mlp_ratio)
        heads = _teacher_heads(cfg, objective)
    if zero3_config is None:
        trunk, heads = trunk.to(dtype), {k: h.to(dtype) for k, h in heads.items()}
    for module in (trunk, *heads.values()):
        for p in module.parameters():
            p.requires_grad_(False)
    check_dtype(trunk, dtype, "the EMA teacher's trunk")
    for name, head in heads.items():
        check_dtype(head, dtype, f"the EMA teacher's {name}")
    return trunk, heads


def _partitioned(zero3_config: Optional[dict], dtype: torch.dtype):
    """``deepspeed.zero.Init`` that creates parameters in ``dtype`` on every machine.

    DeepSpeed 0.19.8 drops an explicit ``dtype`` when the accelerator reports no fp16 support
    (``dtype or fp16 if fp16_supported else bf16 ...`` in ``Init._set_dtype``), so a CPU without
    oneDNN fp16 got bf16 parameters in an fp32 run. ``dtype=None`` makes DeepSpeed read the
    dtype from the config, which is where ``model_dtype`` reads it too; the dtype is then pinned
    in case another DeepSpeed version decides differently, and ``check_dtype`` verifies it."""
    if zero3_config is None:
        return contextlib.nullcontext()
    import deepspeed
    init = deepspeed.zero.Init(config_dict_or_path=zero3_config, dtype=None)
    init.dtype = dtype
    return init


def check_dtype(module: nn.Module, dtype: torch.dtype, what: str = "the model") -> None:
    """Every floating parameter (its local partition under ZeRO-3) and buffer is ``dtype``."""
    tensors = [(n, getattr(p, "ds_tensor", p)) for n, p in module.named_parameters()]
    tensors += list(module.named_buffers())
    wrong = [(n, t.dtype) for n, t in tensors if t.is_floating_point() and t.dtype != dtype]
    if wrong:
        raise RuntimeError(f"{len(wrong)} tensors of {what} are not {dtype}, e.g. {wrong[:3]}")


def build_model(cfg: ModelConfig, objective: ObjectiveConfig, seed: int,
                zero3_config: Optional[dict] = None, dtype: torch.dtype = torch.float32) -> TwoTower:
    """Build the model; with ``zero3_config`` every parameter is partitioned as it is created, so
    no rank ever holds the whole model. Weights are then initialised module by module from
    ``seed`` (identical for any world size)."""
    with _partitioned(zero3_config, dtype):
        model = _construct(cfg, objective)
    if zero3_config is not None:  # without ZeRO-3 the DeepSpeed engine casts the model itself
        check_dtype(model, dtype)
    init_weights(model, seed)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.compile_blocks:
        model.compile_blocks()
    if zero3_config is not None and cfg.zero3_leaf_blocks:
        from deepspeed.utils import set_z3_leaf_module
        leaves = {tower: model.tower_blocks(tower) for tower in towers_run_once(objective)}
        for blocks in leaves.values():
            for blk in blocks:
                set_z3_leaf_module(blk, True)
        _check_leaves_run_once(model, leaves)
    return model


def _check_leaves_run_once(model: TwoTower, leaves: dict[str, list[nn.Module]]) -> None:
    """A training forward that runs a leaf tower twice fails with a message naming the tower,
    not with DeepSpeed's bare assertion in the gradient reduction that follows. (The blocks'
    recomputation under activation checkpointing happens after the forward and is not counted.)"""
    calls = {tower: 0 for tower in leaves}

    def reset(module, args):
        for tower in calls:
            calls[tower] = 0

    def count(tower):
        def hook(module, args):
            calls[tower] += 1
        return hook

    def check(module, args, output):
        twice = [t for t, n in calls.items() if n > 1]
        if twice and module.training and torch.is_grad_enabled():
            raise RuntimeError(
                f"the {', '.join(twice)} tower ran more than once in one training forward, but "
                f"its blocks are ZeRO-3 leaf modules (towers_run_once in megaclip/models/"
                f"registry.py); set model.zero3_leaf_blocks=false or correct towers_run_once")

    for tower, blocks in leaves.items():  # a pass of a tower runs its first block
        blocks[0].register_forward_pre_hook(count(tower))
    if leaves:
        model.register_forward_pre_hook(reset)
        model.register_forward_hook(check)


def towers_run_once(objective: ObjectiveConfig) -> tuple[str, ...]:
    """The towers (``visual``, ``text``) that ``TwoTower.forward`` runs exactly once per training
    forward of ``objective``: the image tower runs on the masked view (with masks), on the full
    global crops (unless the contrastive loss reads the masked view) and on the local crops; the
    text tower on the caption and, with MLM, on the masked caption."""
    masked = objective.uses_masks
    full = not (masked and objective.contrastive_view == "masked")
    local = objective.uses_multicrop and objective.local_global.local_crops > 0
    once = []
    if masked + full + local == 1:
        once.append("visual")
    if objective.text_mlm.weight <= 0:
        once.append("text")
    return tuple(once)


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
        normal_(module.cls_token, 1e-6)
        normal_(module.pos_embed, 0.02, trunc=True)
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
    import deepspeed
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if not params or isinstance(module, TwoTower):
            continue  # the temperature and bias keep their constructor values
        partitioned = any(hasattr(p, "ds_id") for p in params)
        ctx = (deepspeed.zero.GatheredParameters(params, modifier_rank=0) if partitioned
               else contextlib.nullcontext())
        with ctx, torch.no_grad():
            if not partitioned or not dist.is_initialized() or dist.get_rank() == 0:
                _init_module(name, module, gen)
