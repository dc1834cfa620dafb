"""Pretrained files for the ``model.init_from`` tests: an open_clip model with the towers of the
tiny synthetic experiment (CLIP's pre-norm, QuickGELU; a longer text context than the
experiment's, so that loading cuts it), saved as open_clip saves it."""
import dataclasses
import json
import os

import torch

from megaclip.checkpoint import convert
from megaclip.config import load_config
from megaclip.models import resolve_model_config

VOCAB, CONTEXT = 128, 32
# The experiment's overrides that match the file's towers.
ARCH = ["model.vision.pre_norm=true", "model.act=quick_gelu"]


def experiment(*overrides, arch: bool = True):
    """The tiny synthetic experiment (with the file's architecture unless not ``arch``),
    resolved (vocabulary 128)."""
    cfg = load_config("clip_tiny_synthetic", [*(ARCH if arch else []), *overrides])
    return dataclasses.replace(cfg, model=resolve_model_config(cfg.model, VOCAB))


def open_clip_model(seed: int = 0):
    """open_clip's own CustomTextCLIP, random, with non-trivial norms and temperature."""
    import open_clip
    model_cfg = experiment().model
    model_cfg = dataclasses.replace(model_cfg, text=dataclasses.replace(
        model_cfg.text, context_length=CONTEXT))
    oc_cfg = convert.open_clip_model_config(model_cfg, "clip", eos_id=2, pad_id=0)
    oc_cfg.pop("custom_text")
    torch.manual_seed(seed)
    model = open_clip.model.CustomTextCLIP(**oc_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(torch.randn_like(p) * 0.2)
        model.logit_scale.fill_(2.0)
    return model, oc_cfg


def save_open_clip(folder, seed: int = 0, config: bool = True):
    """open_clip_model.safetensors, open_clip_pytorch_model.bin and (``config``) the
    open_clip_config.json of a Hugging Face open_clip folder; returns the model."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    model, oc_cfg = open_clip_model(seed)
    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()},
              os.path.join(folder, "open_clip_model.safetensors"))
    torch.save(state, os.path.join(folder, "open_clip_pytorch_model.bin"))
    if config:
        with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": oc_cfg, "preprocess_cfg": {}}, f)
    return model


def batch(n: int = 3, context: int = 24, seed: int = 0):
    """Images and captions (end-of-text id 2 at ``eot``, padding 0 after it)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 64, 64, generator=g)
    tokens = torch.randint(3, VOCAB, (n, context), generator=g)
    eot = torch.randint(5, context, (n,), generator=g)
    tokens[:, 0] = 1
    for i, e in enumerate(eot.tolist()):
        tokens[i, e], tokens[i, e + 1:] = 2, 0
    return images, tokens, eot


def open_clip_embeddings(model, images, tokens):
    """open_clip's normalised embeddings; the captions padded to its context (its causal mask
    has that size), which changes nothing before their end-of-text."""
    padded = torch.nn.functional.pad(tokens, (0, CONTEXT - tokens.shape[1]))
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(padded, normalize=True)
