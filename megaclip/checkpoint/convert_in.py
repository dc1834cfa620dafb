"""Pretrained open_clip and timm weights under megaclip's names: pure functions of state dicts
(the inverse of ``convert.py``'s exports) that rename, reshape and check every tensor against
the model's shapes.

The formats, told apart by their keys:

* ``open_clip``: open_clip's own ViT (``visual.conv1.weight``, ``visual.transformer.resblocks.N``)
  and text transformer, under ``text.`` (``CustomTextCLIP``) or at the top (``CLIP``:
  ``transformer.resblocks.N``, ``text_projection``), and ``logit_scale``;
* ``open_clip_timm``: an open_clip model whose image tower is a timm ViT (``visual.trunk.*``,
  ``visual.head.proj.weight``);
* ``timm_vit``: a timm ``VisionTransformer`` (``patch_embed.proj.weight``, ``blocks.N.*``): the
  image trunk only (no projection).

Differences handled: open_clip's projections are ``x @ proj`` matrices (megaclip's are linear
layers: transposed); open_clip's patch convolution has no bias (megaclip's trunk has one without
a pre-norm: set to zero); image position embeddings of another grid are resampled (timm's
``resample_abs_pos_embed``); text position embeddings of a longer context are cut to the
model's, a shorter context is refused. Anything of a loaded tower that megaclip's tower has no
place for (layer scale, registers, attention pooling, a projection bias) is an error: the
tower would compute something else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megaclip.checkpoint.convert import OPEN_CLIP_BLOCK_NAMES
from megaclip.config import ModelConfig
from megaclip.errors import UserError

IMAGE, TEXT, SCALE = "image", "text", "logit_scale"
PARTS = (IMAGE, TEXT, SCALE)
TRUNK = "visual.trunk."
# Entries of some files that are not weights (OpenAI's sizes, a causal mask buffer).
NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "attn_mask", "text.attn_mask")
SHOWN = 5  # names shown in a message


def shown(names: Sequence[str]) -> str:
    names = list(names)
    more = f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


@dataclass
class Converted:
    """The tensors of the loaded parts under megaclip's names (views of the file's tensors
    where nothing had to change), which parts they are, the file's keys left out, what was
    adapted on the way, and the file's key of each tensor (none for one set to zero)."""
    state: dict[str, torch.Tensor]
    parts: tuple[str, ...]
    unused: list[str]
    notes: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)


def detect_format(keys) -> str:
    keys = set(keys)
    if "visual.conv1.weight" in keys:
        return "open_clip"
    if TRUNK + "patch_embed.proj.weight" in keys:
        return "open_clip_timm"
    if "patch_embed.proj.weight" in keys and any(k.startswith("blocks.0.") for k in keys):
        return "timm_vit"
    raise UserError(f"not an open_clip or timm ViT checkpoint: none of visual.conv1.weight, "
                    f"visual.trunk.patch_embed.proj.weight, patch_embed.proj.weight among its "
                    f"{len(keys)} keys ({shown(sorted(keys))})")


def _text_prefix(keys) -> Optional[str]:
    """Where an open_clip text transformer sits: ``text.`` or the top; None without one."""
    for prefix in ("text.", ""):
        if prefix + "token_embedding.weight" in keys:
            return prefix
    return None


def parts_in(fmt: str, keys) -> tuple[str, ...]:
    """The parts a file of format ``fmt`` holds."""
    if fmt == "timm_vit":
        return (IMAGE,)
    return (IMAGE,) + ((TEXT,) if _text_prefix(keys) is not None else ()) \
        + ((SCALE,) if "logit_scale" in keys else ())


def _part_keys(fmt: str, part: str, keys) -> list[str]:
    """The file's keys that belong to ``part``."""
    if part == SCALE:
        return [k for k in keys if k in ("logit_scale", "logit_bias")]
    if fmt == "timm_vit":
        return [k for k in keys if k not in NOT_WEIGHTS] if part == IMAGE else []
    if part == IMAGE:
        return [k for k in keys if k.startswith("visual.")]
    prefix = _text_prefix(keys)
    if prefix == "text.":
        return [k for k in keys if k.startswith("text.") and k not in NOT_WEIGHTS]
    return [k for k in keys if not k.startswith(("visual.", "text.")) and k not in NOT_WEIGHTS
            and k not in ("logit_scale", "logit_bias")]


class _Taker:
    """Collects (megaclip name -> value) and which file keys were used."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state, self.out, self.used, self.source = state, {}, set(), {}

    def take(self, src: str, dst: str, value: Optional[torch.Tensor] = None) -> None:
        self.out[dst] = self.state[src] if value is None else value
        self.used.add(src)
        self.source[dst] = src

    def blocks(self, src: str, dst: str, depth: int, depth_key: str, open_clip: bool) -> None:
        """Blocks ``src``N.* -> ``dst``N.*, open_clip's names turned into timm's; the file must
        have the model's number of blocks."""
        inverse = {new: old for old, new in OPEN_CLIP_BLOCK_NAMES.items()}
        seen = set()
        for key in self.state:
            if not key.startswith(src):
                continue
            index, _, rest = key[len(src):].partition(".")
            if not index.isdigit():
                continue
            if open_clip:
                match = next((new for new in inverse if rest == new or rest.startswith(new + ".")),
                             None)
                if match is None:
                    continue  # left over: named in the error
                rest = inverse[match] + rest[len(match):]
            seen.add(int(index))
            self.take(key, f"{dst}{index}.{rest}")
        if len(seen) != depth:
            raise UserError(f"the file's tower has {len(seen)} blocks ({src}N), the model "
                            f"{depth}: set {depth_key}={len(seen)}")


def _image_pos(pos_1NW: torch.Tensor, want_shape: tuple, notes: list[str]) -> torch.Tensor:
    """Position embeddings (class token first) for the model's patch grid: resampled with
    timm's ``resample_abs_pos_embed`` when the grid differs."""
    have, want = pos_1NW.shape[1] - 1, want_shape[1] - 1
    if have == want or pos_1NW.shape[-1] != want_shape[-1]:
        return pos_1NW  # (a width mismatch is reported with the other shapes)
    old, new = math.isqrt(have), math.isqrt(want)
    if old * old != have or new * new != want:
        raise UserError(f"image position embeddings of {have} patches cannot be resampled to "
                        f"{want}: only square grids are")
    from timm.layers import resample_abs_pos_embed
    notes.append(f"image position embeddings resampled from a {old}x{old} to a {new}x{new} "
                 f"patch grid (bicubic, timm's resample_abs_pos_embed)")
    return resample_abs_pos_embed(pos_1NW.float(), [new, new], [old, old],
                                  num_prefix_tokens=1).to(pos_1NW.dtype)


def _text_pos(pos_LW: torch.Tensor, want_shape: tuple, notes: list[str]) -> torch.Tensor:
    """Text position embeddings for the model's context: the first positions of a longer one;
    a shorter one is refused (positions are cut, never made up)."""
    have, want = pos_LW.shape[0], want_shape[0]
    if have < want:
        raise UserError(f"the file's text tower has a context of {have} tokens, the model "
                        f"{want}: set model.text.context_length={have} (or less)")
    if have > want:
        notes.append(f"text position embeddings cut from a context of {have} to the first {want}")
        return pos_LW[:want]
    return pos_LW


def _pre_norm(t: _Taker, src: str, cfg: ModelConfig) -> None:
    """CLIP's ln_pre: the file and ``model.vision.pre_norm`` must agree."""
    has = src + "weight" in t.state
    if has and not cfg.vision.pre_norm:
        raise UserError(f"the file's image tower has a pre-norm ({src}weight, CLIP's ln_pre) "
                        f"but the model has none: set model.vision.pre_norm=true")
    if not has and cfg.vision.pre_norm:
        raise UserError("the model has a pre-norm (model.vision.pre_norm=true) but the file's "
                        "image tower has none: set model.vision.pre_norm=false")
    if has:
        for leaf in ("weight", "bias"):
            t.take(src + leaf, f"{TRUNK}norm_pre.{leaf}")


def _patch_bias(t: _Taker, src: Optional[str], shapes: dict, notes: list[str]) -> None:
    dst = TRUNK + "patch_embed.proj.bias"
    if src is not None and src in t.state:
        t.take(src, dst)
    elif dst in shapes:
        t.out[dst] = torch.zeros(shapes[dst])
        notes.append(f"{dst} set to zero (the file's patch embedding has no bias)")


def _open_clip_image(t: _Taker, cfg: ModelConfig, shapes: dict, notes: list[str]) -> None:
    p = "visual."
    t.take(p + "conv1.weight", TRUNK + "patch_embed.proj.weight")
    _patch_bias(t, p + "conv1.bias", shapes, notes)
    t.take(p + "class_embedding", TRUNK + "cls_token",
           t.state[p + "class_embedding"].reshape(1, 1, -1))
    t.take(p + "positional_embedding", TRUNK + "pos_embed",
           _image_pos(t.state[p + "positional_embedding"][None], shapes[TRUNK + "pos_embed"],
                      notes))
    _pre_norm(t, p + "ln_pre.", cfg)
    t.blocks(p + "transformer.resblocks.", TRUNK + "blocks.", cfg.vision.depth,
             "model.vision.depth", open_clip=True)
    for leaf in ("weight", "bias"):
        t.take(f"{p}ln_post.{leaf}", f"{TRUNK}norm.{leaf}")
    t.take(p + "proj", "visual.proj.weight", t.state[p + "proj"].T)


def _timm_trunk(t: _Taker, p: str, cfg: ModelConfig, shapes: dict, notes: list[str]) -> None:
    """A timm ViT's parameters under ``p`` (``""`` or open_clip's ``visual.trunk.``)."""
    if p + "cls_token" not in t.state:
        raise UserError("the file's ViT has no class token (it pools otherwise, e.g. by "
                        "attention as SigLIP's): megaclip's image tower pools at the class token")
    if p + "fc_norm.weight" in t.state:
        raise UserError(f"the file's ViT pools by averaging its tokens ({p}fc_norm): megaclip's "
                        f"image tower pools at the class token")
    t.take(p + "cls_token", TRUNK + "cls_token")
    t.take(p + "pos_embed", TRUNK + "pos_embed",
           _image_pos(t.state[p + "pos_embed"], shapes[TRUNK + "pos_embed"], notes))
    t.take(p + "patch_embed.proj.weight", TRUNK + "patch_embed.proj.weight")
    _patch_bias(t, p + "patch_embed.proj.bias", shapes, notes)
    _pre_norm(t, p + "norm_pre.", cfg)
    t.blocks(p + "blocks.", TRUNK + "blocks.", cfg.vision.depth, "model.vision.depth",
             open_clip=False)
    for leaf in ("weight", "bias"):
        t.take(f"{p}norm.{leaf}", f"{TRUNK}norm.{leaf}")


def _open_clip_text(t: _Taker, cfg: ModelConfig, shapes: dict, notes: list[str]) -> None:
    p = _text_prefix(t.state)
    t.take(p + "token_embedding.weight", "text.token_embedding.weight")
    t.take(p + "positional_embedding", "text.positional_embedding",
           _text_pos(t.state[p + "positional_embedding"], shapes["text.positional_embedding"],
                     notes))
    t.blocks(p + "transformer.resblocks.", "text.blocks.", cfg.text.depth, "model.text.depth",
             open_clip=True)
    for leaf in ("weight", "bias"):
        t.take(f"{p}ln_final.{leaf}", f"text.ln_final.{leaf}")
    proj = p + "text_projection"
    # open_clip's SigLIP text towers (bidirectional, read at the last position) end in a linear
    # layer with a bias, its CLIP ones in a bias-free one: the weights of one do not compute the
    # other, so the file's kind must be the model's (model.text.causal, pool, proj_bias).
    file_siglip = proj + ".bias" in t.state
    t_cfg = cfg.text
    model_siglip = (not t_cfg.causal) or t_cfg.pool == "last" or t_cfg.proj_bias
    if file_siglip != model_siglip:
        raise UserError(
            f"the file's text tower is {'SigLIP' if file_siglip else 'CLIP'}'s (its projection "
            f"{'has' if file_siglip else 'has no'} bias) but the model's is "
            f"{'SigLIP' if model_siglip else 'CLIP'}'s (model.text.causal={t_cfg.causal}, "
            f"pool={t_cfg.pool}, proj_bias={t_cfg.proj_bias}); set them as the file's tower "
            f"was trained, or load the image tower only (model.init_from_towers=[image])")
    if proj in t.state:  # a matrix: x @ proj
        t.take(proj, "text.proj.weight", t.state[proj].T)
    elif proj + ".weight" in t.state:  # a linear layer (open_clip's proj_type linear)
        t.take(proj + ".weight", "text.proj.weight")
        if file_siglip:
            t.take(proj + ".bias", "text.proj.bias")


def from_pretrained(state: dict[str, torch.Tensor], shapes: dict[str, tuple], cfg: ModelConfig,
                    parts: Sequence[str] = ()) -> Converted:
    """``state`` (an open_clip or timm ViT state dict) under megaclip's names, for a model whose
    parameter shapes are ``shapes`` (resolved config ``cfg``): the ``parts`` asked for (empty:
    every part the file holds). Key or shape mismatches are ``UserError``s naming them."""
    fmt = detect_format(state)
    held = parts_in(fmt, state)
    missing = [p for p in parts if p not in held]
    if missing:
        raise UserError(f"model.init_from_towers asks for {', '.join(missing)}, but the file "
                        f"({fmt}) holds {', '.join(held)} only")
    parts = tuple(p for p in PARTS if p in (parts or held))
    notes: list[str] = []
    t = _Taker(state)
    if IMAGE in parts:
        if fmt == "open_clip":
            _open_clip_image(t, cfg, shapes, notes)
        else:
            _timm_trunk(t, TRUNK if fmt == "open_clip_timm" else "", cfg, shapes, notes)
        if fmt == "open_clip_timm" and "visual.head.proj.weight" in state:
            t.take("visual.head.proj.weight", "visual.proj.weight")
        if fmt == "timm_vit":  # the classifier is not the image tower's
            t.used.update(k for k in state if k.startswith("head."))
    if TEXT in parts:
        _open_clip_text(t, cfg, shapes, notes)
    if SCALE in parts:
        for name in ("logit_scale", "logit_bias"):
            if name in state and name in shapes:
                t.take(name, name, state[name].reshape(1))
    # Whatever a loaded part holds and megaclip's tower has no place for changes what it computes.
    strays = [k for part in parts for k in _part_keys(fmt, part, state)
              if k not in t.used and not (part == SCALE and k not in shapes)
              and not (fmt == "timm_vit" and k.startswith("head."))]
    strays += [src for dst, src in t.source.items() if dst not in shapes]
    if strays:
        raise UserError(f"the file's {'/'.join(parts)} tower(s) hold tensors megaclip's have no "
                        f"place for (another architecture: layer scale, registers, attention "
                        f"pooling, a projection bias...): {shown(sorted(strays))}")
    wrong = [f"{k}: file {tuple(v.shape)}, model {tuple(shapes[k])}"
             for k, v in t.out.items() if tuple(v.shape) != tuple(shapes[k])]
    if wrong:
        hint = ("; the text vocabulary is data.tokenizer's: a text tower loads only with the "
                "tokenizer it was trained with (model.init_from_towers=[image] leaves it out)"
                if any(w.startswith("text.token_embedding") for w in wrong) else "")
        raise UserError(f"{len(wrong)} tensor(s) of the file do not have the model's shape "
                        f"(check model.preset and the model.vision / model.text sizes){hint}: "
                        + "; ".join(wrong[:SHOWN]))
    unused = sorted(k for k in state if k not in t.used)
    return Converted(t.out, parts, unused, notes, t.source)


def file_activation(config: Optional[tuple[str, dict]], path: str
                    ) -> tuple[Optional[str], str]:
    """(the activation the file's blocks use, or None where nothing says; how it was told),
    from the model config beside the file (``open_clip_config.json`` of a Hugging Face
    open_clip folder, megaclip's open_clip export, timm's ``config.json``) or from an open_clip
    model name in its path (``...-quickgelu``)."""
    if config is not None:
        name, data = config
        model_cfg = data.get("model_cfg", data)
        if isinstance(model_cfg, dict) and ("vision_cfg" in model_cfg or "text_cfg" in model_cfg):
            quick = bool(model_cfg.get("quick_gelu", False))
            return ("quick_gelu" if quick else "gelu",
                    f"{name} says quick_gelu: {str(quick).lower()}")
        arch = str(data.get("architecture", ""))
        act = (data.get("model_args") or {}).get("act_layer")
        if isinstance(act, str):
            return act, f"{name} says act_layer: {act}"
        if "quickgelu" in arch:
            return "quick_gelu", f"{name} names the architecture {arch}"
    if "quickgelu" in path.replace("_", "").lower():
        return "quick_gelu", "its path names a quickgelu model"
    return None, ("nothing beside the file says (no open_clip_config.json or config.json with "
                  "the activation)")
