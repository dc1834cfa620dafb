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
    if v.pool == "map":  # timm's SigLIP ViTs: no class token, attention pooling
        kwargs.update(class_token=False, global_pool="map")
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
    if (v.pool, t.causal, t.pool, t.proj_bias) != ("token", True, "eot", False):
        raise ValueError("the open_clip export holds CLIP's towers (model.vision.pool=token, a "
                         "causal text tower pooled at the end of text, no projection bias); "
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


# --------------------------------------------------------------------------- transformers

HF_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
HF_SKIP = ("text.mask_embedding", "patch_decoder.", "distill_head.", "global_head.",
           "text_decoder.")  # student-side modules of the objectives, not of the two towers
_HF_BLOCK = {"norm1.": "layer_norm1.", "norm2.": "layer_norm2.", "attn.proj.": "self_attn.out_proj.",
             "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}


CLIP_TOWERS = ("token", True, "eot", False)  # vision.pool, text.causal, text.pool, text.proj_bias
SIGLIP_TOWERS = ("map", False, "last", True)


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class that holds the resolved model ``cfg`` exactly: ``CLIPModel`` or
    ``SiglipModel``; a ValueError naming the options and the formats that work otherwise."""
    v, t = cfg.vision, cfg.text
    towers = (v.pool, t.causal, t.pool, t.proj_bias)
    if towers == SIGLIP_TOWERS:
        if v.pre_norm:
            raise ValueError("transformers' SiglipModel has no LayerNorm before the first image "
                             "block (model.vision.pre_norm=true): export it as timm or "
                             "safetensors")
        return "SiglipModel"
    if towers != CLIP_TOWERS:
        raise ValueError(
            f"transformers holds CLIP's towers (CLIPModel: model.vision.pool=token, "
            f"model.text.causal=true, model.text.pool=eot, model.text.proj_bias=false) or "
            f"SigLIP's (SiglipModel: model.vision.pool=map, model.text.causal=false, "
            f"model.text.pool=last, model.text.proj_bias=true), not vision.pool={v.pool}, "
            f"text.causal={str(t.causal).lower()}, text.pool={t.pool}, "
            f"text.proj_bias={str(t.proj_bias).lower()}: export it as timm or safetensors")
    if not v.pre_norm:
        raise ValueError(
            "transformers' CLIPModel always applies a LayerNorm to the image tokens before the "
            "first block (pre_layrnorm), which this model does not have (model.vision.pre_norm="
            "false, the default), and no LayerNorm can be the identity: export it as timm, "
            "open_clip or safetensors, or train with model.vision.pre_norm=true for the hf format")
    return "CLIPModel"


def hf_token_order(vocab_size: int, eos_id: int) -> Optional[list[int]]:
    """The exported id of each megaclip token id, or None where they are the same.

    transformers' CLIPTextModel pools at the first end-of-text id, except when its
    ``eos_token_id`` is 2 (SentencePiece's default): then it keeps a legacy rule, the position of
    the largest id. An end-of-text id 2 is therefore swapped with the last id, in the token
    embedding and the tokenizer's vocabulary alike; both rules then find it."""
    if eos_id != 2 or vocab_size <= 3:
        return None
    order = list(range(vocab_size))
    order[eos_id], order[-1] = order[-1], order[eos_id]
    return order


def _permute_rows(weight: torch.Tensor, order: Optional[list[int]]) -> torch.Tensor:
    if order is None:
        return weight
    out = torch.empty_like(weight)
    out[torch.tensor(order)] = weight
    return out


def hf_config(cfg: ModelConfig, contrastive: str, ids: dict[str, int], logit_scale: float,
              logit_bias: Optional[float] = None) -> dict:
    """The keyword arguments of transformers' ``CLIPConfig`` or ``SiglipConfig``
    (``hf_architecture``) for the resolved model ``cfg``. ``ids``: the exported bos, eos and pad
    ids. One LayerNorm eps per tower: 1e-6, as every norm of megaclip's but its final text norm
    (1e-5), a difference of about 1e-6 in the text embeddings. A SigLIP objective's bias on a
    CLIPModel (which has none) is recorded under ``megaclip``."""
    arch = hf_architecture(cfg)
    v, t = cfg.vision, cfg.text
    act = HF_ACTS[cfg.act]
    text = {"vocab_size": t.vocab_size, "hidden_size": t.width,
            "intermediate_size": int(t.width * t.mlp_ratio), "num_hidden_layers": t.depth,
            "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
            "hidden_act": act, "layer_norm_eps": 1e-6, "bos_token_id": ids["bos"],
            "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
    vision = {"hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio),
              "num_hidden_layers": v.depth, "num_attention_heads": v.heads,
              "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": 3,
              "hidden_act": act, "layer_norm_eps": 1e-6}
    out = {"architectures": [arch], "text_config": text, "vision_config": vision,
           "megaclip": {"contrastive": contrastive}}
    if arch == "SiglipModel":
        text["projection_size"] = cfg.embed_dim
        vision["vision_use_head"] = True
    else:
        text["projection_dim"] = vision["projection_dim"] = cfg.embed_dim
        out.update(projection_dim=cfg.embed_dim, logit_scale_init_value=logit_scale)
        if logit_bias is not None:
            out["megaclip"]["logit_bias"] = logit_bias
    return out


def _hf_blocks(state: dict, src: str, dst: str, depth: int, used: set) -> dict:
    """timm ``Block`` i under ``src`` -> transformers ``CLIPEncoderLayer`` (or Siglip's) i under
    ``dst``: the fused qkv split into q, k and v (timm's order). Adds the keys read to ``used``."""
    out = {}
    for i in range(depth):
        prefix, to = f"{src}blocks.{i}.", f"{dst}encoder.layers.{i}."
        for key, value in state.items():
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            used.add(key)
            if rest.startswith("attn.qkv."):
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{to}self_attn.{name}_proj.{rest[len('attn.qkv.'):]}"] = part
                continue
            mapped = next((new + rest[len(old):] for old, new in _HF_BLOCK.items()
                           if rest.startswith(old)), None)
            if mapped is None:
                raise KeyError(f"no transformers name for {key}")
            out[to + mapped] = value
    return out


def _check_consumed(state: dict, used: set, prefixes: tuple) -> None:
    left = sorted(k for k in state if k.startswith(prefixes) and not k.startswith(HF_SKIP)
                  and k not in used)
    if left:
        raise KeyError(f"{len(left)} tensors have no transformers name: {left[:5]}")


def hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig,
             order: Optional[list[int]] = None) -> dict[str, torch.Tensor]:
    """A consolidated megaclip model state -> transformers ``CLIPModel`` or ``SiglipModel``
    state (strict; ``hf_architecture``), the token embedding's rows in the exported order
    (``hf_token_order``). For CLIPModel, whose patch embedding has no bias, a bias is folded into
    the patch positions' embeddings (the same vector added to the same tokens), as for
    open_clip. The temperature is clamped as megaclip's forward does."""
    siglip = hf_architecture(cfg) == "SiglipModel"
    v, t = "visual.trunk.", "text."
    same = None
    names = {
        "vision_model.embeddings.patch_embedding.weight": (v + "patch_embed.proj.weight", same),
        "vision_model.post_layernorm.weight": (v + "norm.weight", same),
        "vision_model.post_layernorm.bias": (v + "norm.bias", same),
        "text_model.embeddings.token_embedding.weight": (
            t + "token_embedding.weight", lambda x: _permute_rows(x, order)),
        "text_model.embeddings.position_embedding.weight": (t + "positional_embedding", same),
        "text_model.final_layer_norm.weight": (t + "ln_final.weight", same),
        "text_model.final_layer_norm.bias": (t + "ln_final.bias", same),
    }
    scale = state["logit_scale"].reshape(()).clamp(max=math.log(cfg.max_logit_scale))
    out = {}
    used = {"logit_scale", "logit_bias"}
    if siglip:
        pool = v + "attn_pool."
        names.update({
            "vision_model.embeddings.patch_embedding.bias": (v + "patch_embed.proj.bias", same),
            "vision_model.embeddings.position_embedding.weight": (v + "pos_embed",
                                                                  lambda x: x[0]),
            "vision_model.head.probe": (pool + "latent", same),
            "vision_model.head.attention.out_proj.weight": (pool + "proj.weight", same),
            "vision_model.head.attention.out_proj.bias": (pool + "proj.bias", same),
            "vision_model.head.layernorm.weight": (pool + "norm.weight", same),
            "vision_model.head.layernorm.bias": (pool + "norm.bias", same),
            "text_model.head.weight": (t + "proj.weight", same),
            "text_model.head.bias": (t + "proj.bias", same)})
        for part in ("fc1", "fc2"):
            for kind in ("weight", "bias"):
                names[f"vision_model.head.mlp.{part}.{kind}"] = (f"{pool}mlp.{part}.{kind}", same)
        for kind in ("weight", "bias"):  # nn.MultiheadAttention's packed q, k, v
            out[f"vision_model.head.attention.in_proj_{kind}"] = torch.cat(
                [state[f"{pool}q.{kind}"], state[f"{pool}kv.{kind}"]])
            used.update({f"{pool}q.{kind}", f"{pool}kv.{kind}"})
        out["logit_scale"] = scale.reshape(1)
        # a SigLIP tower trained with the softmax loss has no bias: 0 adds nothing
        out["logit_bias"] = state.get("logit_bias", torch.zeros(1)).reshape(1)
    else:
        pos = state[v + "pos_embed"][0].clone()
        if v + "patch_embed.proj.bias" in state:
            pos[1:] += state[v + "patch_embed.proj.bias"]
        out["vision_model.embeddings.position_embedding.weight"] = pos
        used.update({v + "pos_embed", v + "patch_embed.proj.bias"})
        names.update({
            "vision_model.embeddings.class_embedding": (v + "cls_token", lambda x: x.reshape(-1)),
            "vision_model.pre_layrnorm.weight": (v + "norm_pre.weight", same),
            "vision_model.pre_layrnorm.bias": (v + "norm_pre.bias", same),
            "visual_projection.weight": ("visual.proj.weight", same),
            "text_projection.weight": (t + "proj.weight", same)})
        out["logit_scale"] = scale
    for name, (key, fn) in names.items():
        out[name] = fn(state[key]) if fn else state[key]
        used.add(key)
    for src, dst, depth in ((v, "vision_model.", cfg.vision.depth),
                            (t, "text_model.", cfg.text.depth)):
        out.update(_hf_blocks(state, src, dst, depth, used))
    _check_consumed(state, used, ("visual.", "text."))
    return {k: x.detach().contiguous() for k, x in out.items()}
