"""The transformers export of a checkpoint: a folder that ``CLIPModel.from_pretrained`` (or
``SiglipModel``'s, for SigLIP's towers) and ``AutoTokenizer.from_pretrained`` load offline, no
custom code (``convert.py`` holds the conversions, ``hf_tokenizer.py`` the tokenizer), and its
verification against megaclip."""
from __future__ import annotations

import json
import math
import os

from megaclip.errors import UserError

VERIFY_CAPTIONS = ["a small red circle and two large blue squares.", "x", "the " * 100,
                   "  Two  GREEN triangles, 3 squares;\tno circle ", ""]


def hf_architecture(cfg) -> str:
    """The transformers class of the run's model (``convert.hf_architecture``), or a UserError
    naming the option to change and the formats that work."""
    from megaclip.checkpoint import convert
    try:
        return convert.hf_architecture(cfg.model)
    except ValueError as e:
        raise UserError(f"--formats hf: {e}") from None


def _offline() -> None:
    # The export and its check read and write local files only: never ask the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def export_hf(out: str, tag_dir: str, cfg, shown: str = "") -> list[str]:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json into
    ``out``; returns their names. ``shown``: the folder the printed call names."""
    _offline()
    import transformers
    from safetensors.torch import save_file

    from megaclip.checkpoint import convert
    from megaclip.checkpoint.hf_tokenizer import hf_tokenizer, special_ids
    from megaclip.checkpoint.io import consolidate
    arch = hf_architecture(cfg)
    with open(cfg.data.tokenizer, "rb") as f:
        spm_model = f.read()
    ids = special_ids(spm_model)
    # SigLIP's text tower pools at the last position: no end-of-text id to move
    order = (convert.hf_token_order(cfg.model.text.vocab_size, ids["eos"])
             if arch == "CLIPModel" else None)
    exported = {k: (order[i] if order else i) for k, i in ids.items()}
    state = consolidate(tag_dir, keep=lambda k: not k.startswith(convert.HF_SKIP))
    scale = float(state["logit_scale"].detach().reshape(()).clamp(
        max=math.log(cfg.model.max_logit_scale)))
    bias = float(state["logit_bias"].detach().reshape(())) if "logit_bias" in state else None
    kwargs = convert.hf_config(cfg.model, cfg.objective.contrastive, exported, scale, bias)
    weights = convert.hf_state(state, cfg.model, order)
    del state
    # the whole config: transformers' diff against a default one warns about the default's ids
    getattr(transformers, arch.replace("Model", "Config"))(**kwargs).to_json_file(
        os.path.join(out, "config.json"), use_diff=False)
    save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    del weights
    # SigLIP's text tower attends to every position, padding included, as megaclip's does
    names = ("input_ids",) if arch == "SiglipModel" else ("input_ids", "attention_mask")
    text, tok_config = hf_tokenizer(spm_model, cfg.model.text.context_length, order, names)
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tok_config, f, indent=1)
    shown = shown or out
    print(f"hf: transformers.{arch}.from_pretrained('{shown}'); tokens = transformers.AutoTokenizer"
          f".from_pretrained('{shown}')(captions, padding='max_length', truncation=True, "
          f"return_tensors='pt')")
    if order:
        print(f"hf: the end-of-text id {ids['eos']} is exported as {order[ids['eos']]} (swapped "
              f"with that piece): transformers reads an eos_token_id of 2 as its legacy "
              f"'largest id' pooling")
    return ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def verify_hf(out: str, tag_dir: str) -> float:
    """transformers' model and tokenizer from ``out`` against megaclip: the token ids of a few
    captions (inf unless megaclip's, in the exported order), then the normalised image and text
    embeddings of random pixels and those captions and their logits (SigLIP's with the bias);
    prints each difference, returns the largest."""
    _offline()
    import torch
    import transformers

    from megaclip.checkpoint import convert
    from megaclip.checkpoint.inference import load_for_inference
    from megaclip.data.tokenizer import Tokenizer
    reference, cfg = load_for_inference(tag_dir)
    arch = hf_architecture(cfg)
    model, info = getattr(transformers, arch).from_pretrained(out, output_loading_info=True)
    wrong = {k: v for k, v in info.items() if v}
    if wrong:
        print(f"verify hf: {arch} did not load the weights exactly: {wrong}")
        return float("inf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    tok = Tokenizer(cfg.data.tokenizer, cfg.model.text.context_length)
    tokens, eot = tok.encode(VERIFY_CAPTIONS)
    order = (convert.hf_token_order(cfg.model.text.vocab_size, tok.eos_id)
             if arch == "CLIPModel" else None)
    expected = torch.tensor(order)[tokens] if order else tokens
    inputs = hf_tok(VERIFY_CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")
    if not torch.equal(inputs["input_ids"], expected):
        print("verify hf: the exported tokenizer's ids differ from megaclip's")
        return float("inf")
    side = cfg.model.vision.image_size
    images = torch.randn(len(VERIFY_CAPTIONS), 3, side, side,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = reference(images=images, tokens=tokens, eot=eot)
        theirs = model.eval()(pixel_values=images, **inputs)
        logits = ours["logit_scale"] * ours["text_features"] @ ours["image_features"].T
        if arch == "SiglipModel" and "logit_bias" in ours:
            logits = logits + ours["logit_bias"]
    image = float((ours["image_features"] - theirs.image_embeds).abs().max())
    text = float((ours["text_features"] - theirs.text_embeds).abs().max())
    # in embedding units: the scale (up to 100) multiplies the embeddings' difference
    logit = float((logits - theirs.logits_per_text).abs().max() / ours["logit_scale"])
    print(f"verify hf: {arch}, token ids equal megaclip's; largest difference image {image:.3g}, "
          f"text {text:.3g} (transformers gives the final text LayerNorm its blocks' eps 1e-6, "
          f"megaclip 1e-5), logits / scale {logit:.3g}")
    return max(image, text, logit)
