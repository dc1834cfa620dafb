"""Conversions of a consolidated megaclip state for downstream libraries, as pure functions of
state dicts and configs (no files, no model building).

* ``timm_vision``: the image trunk (student or EMA teacher) as the state dict of a timm
  ``VisionTransformer`` with ``num_classes=0``, and the ``timm.create_model`` call that builds it.
* ``safetensors_state``: the whole model (and optionally the teacher, under ``ema_teacher.``) as
  contiguous tensors, the form ``safetensors.torch.save_file`` takes.
"""
from __future__ import annotations

import math
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
    known = key in TIMM_ARCHS and v.mlp_ratio == 4.0
    arch = TIMM_ARCHS[key] if known else "vit_base_patch16_224"
    kwargs = {"num_classes": 0, "img_size": v.image_size, "dynamic_img_size": True}
    if v.pre_norm:
        kwargs["pre_norm"] = True
    if cfg.act != "gelu":
        kwargs["act_layer"] = cfg.act
    if not known:
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


# --------------------------------------------------------------------------- open_clip

def open_clip_model_config(cfg: ModelConfig, contrastive: str, eos_id: int, pad_id: int) -> dict:
    """An open_clip model config (``open_clip.add_model_config``) with megaclip's towers:
    open_clip's own ViT (pre-norm as megaclip's, class-token pooling, timm's LayerNorm eps) and
    its text transformer pooled at the tokenizer's end-of-text id. open_clip gives every text
    norm one eps: 1e-6, the blocks'; megaclip's final text norm has 1e-5, a difference of about
    1e-6 in the text embeddings. open_clip's blocks run GELU or QuickGELU, not tanh GELU."""
    v, t = cfg.vision, cfg.text
    if cfg.act == "gelu_tanh":
        raise ValueError("open_clip's own towers have no tanh GELU (model.act=gelu_tanh); "
                         "export timm, safetensors or hf instead")
    out = {
        "embed_dim": cfg.embed_dim,
        "custom_text": True,
        "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width,
                       "layers": v.depth, "head_width": v.width // v.heads,
                       "mlp_ratio": v.mlp_ratio, "no_ln_pre": not v.pre_norm, "pool_type": "tok",
                       "norm_kwargs": {"eps": 1e-6}},
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size,
                     "width": t.width, "heads": t.heads, "layers": t.depth,
                     "mlp_ratio": t.mlp_ratio, "pool_type": "eos", "eos_id": eos_id,
                     "pad_id": pad_id, "proj_bias": False,
                     "norm_kwargs": {"eps": 1e-6}},
    }
    if cfg.act == "quick_gelu":
        out["quick_gelu"] = True
    if contrastive == "siglip":
        out["init_logit_bias"] = -10.0
    return out


# timm ``Block`` name -> open_clip ``ResidualAttentionBlock`` name (prefixes of the parameter
# names; timm's packed qkv is laid out as open_clip's in_proj: q, k, v rows).
OPEN_CLIP_BLOCK_NAMES = {"norm1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight",
                         "attn.qkv.bias": "attn.in_proj_bias", "attn.proj": "attn.out_proj",
                         "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _blocks_to_open_clip(state: dict, src: str, dst: str, depth: int) -> dict:
    """timm ``Block`` i under ``src`` -> open_clip ``ResidualAttentionBlock`` i under ``dst``."""
    names = OPEN_CLIP_BLOCK_NAMES
    out = {}
    for i in range(depth):
        prefix = f"{src}blocks.{i}."
        for key, value in state.items():
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            mapped = next((new + rest[len(old):] for old, new in names.items()
                           if rest.startswith(old)), None)
            if mapped is None:
                raise KeyError(f"no open_clip name for {key}")
            out[f"{dst}transformer.resblocks.{i}.{mapped}"] = value
    return out


def open_clip_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A consolidated megaclip model state -> open_clip ``CustomTextCLIP`` state (strict).

    The patch embedding's bias (timm's ViT has one unless it has a pre-norm, as CLIP's; open_clip's
    conv has none) is folded into the patch positions' embeddings, which adds the same vector to
    the same tokens."""
    v, t = "visual.trunk.", "text."
    pos = state[v + "pos_embed"][0].clone()
    if v + "patch_embed.proj.bias" in state:
        pos[1:] += state[v + "patch_embed.proj.bias"]
    out = {
        "visual.conv1.weight": state[v + "patch_embed.proj.weight"],
        "visual.class_embedding": state[v + "cls_token"].reshape(-1),
        "visual.positional_embedding": pos,
        "visual.ln_post.weight": state[v + "norm.weight"],
        "visual.ln_post.bias": state[v + "norm.bias"],
        "visual.proj": state["visual.proj.weight"].T,
        "text.token_embedding.weight": state[t + "token_embedding.weight"],
        "text.positional_embedding": state[t + "positional_embedding"],
        "text.ln_final.weight": state[t + "ln_final.weight"],
        "text.ln_final.bias": state[t + "ln_final.bias"],
        "text.text_projection": state[t + "proj.weight"].T,
        # megaclip clamps the temperature in its forward; open_clip reads the parameter as is.
        "logit_scale": state["logit_scale"].reshape(()).clamp(max=math.log(cfg.max_logit_scale)),
    }
    if "logit_bias" in state:
        out["logit_bias"] = state["logit_bias"].reshape(())
    if cfg.vision.pre_norm:
        out["visual.ln_pre.weight"] = state[v + "norm_pre.weight"]
        out["visual.ln_pre.bias"] = state[v + "norm_pre.bias"]
    out.update(_blocks_to_open_clip(state, v, "visual.", cfg.vision.depth))
    out.update(_blocks_to_open_clip(state, t, "text.", cfg.text.depth))
    return {k: x.contiguous() for k, x in out.items()}


TOKENIZER_MODULE = '''"""The tokenizer of this export: the ids megaclip trained on, [BOS] pieces... [EOS] [PAD]...
    import sys; sys.path.insert(0, "<export dir>")
    from megaclip_tokenizer import tokenize; tokens = tokenize(["a photo of a dog"])
"""
import os

import sentencepiece as spm
import torch

CONTEXT_LENGTH, BOS, EOS, PAD = {context_length}, {bos}, {eos}, {pad}
_SP = spm.SentencePieceProcessor(model_file=os.path.join(os.path.dirname(__file__), "spm.model"))


def tokenize(texts, context_length=CONTEXT_LENGTH):
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = torch.full((len(texts), context_length), PAD, dtype=torch.long)
    for i, ids in enumerate(_SP.encode(texts)):
        seq = [BOS] + ids[: context_length - 2] + [EOS]
        out[i, : len(seq)] = torch.tensor(seq)
    return out
'''
