"""Model presets and the resolution of a model config against its preset and tokenizer."""
from __future__ import annotations

import dataclasses

from megaclip.config import ModelConfig, ObjectiveConfig
from megaclip.errors import UserError

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
    embed_dim = cfg.embed_dim or preset["embed_dim"]
    if vision.pool == "map" and embed_dim != vision.width:
        raise UserError(f"model.vision.pool=map has no projection: model.embed_dim ({embed_dim}) "
                        f"must be model.vision.width ({vision.width})")
    return dataclasses.replace(cfg, vision=vision, text=text, embed_dim=embed_dim)


def check_multicrop(cfg: ModelConfig, objective: ObjectiveConfig) -> None:
    """The local crops must tile into whole patches (resolved model config)."""
    lg = objective.local_global
    if objective.uses_multicrop and lg.local_crops and lg.local_size % cfg.vision.patch_size:
        raise UserError(f"objective.local_global.local_size {lg.local_size} is not a multiple of "
                        f"model.vision.patch_size {cfg.vision.patch_size}")
