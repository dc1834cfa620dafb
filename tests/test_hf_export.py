"""The transformers export: CLIPModel, and SiglipModel for SigLIP's towers, with their tokenizer,
give megaclip's embeddings, logits and token ids; an end-of-text id 2 is moved off transformers'
legacy pooling; a model without CLIP's pre-norm is refused; checkpoints of a 2-rank ZeRO-3 CLIP
run and a SigLIP run go through tools/convert_checkpoint.py --formats hf."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from megaclip.checkpoint import convert
from megaclip.checkpoint.hf_tokenizer import hf_tokenizer, special_ids
from megaclip.config import ModelConfig, ObjectiveConfig, TextConfig, VisionConfig
from megaclip.data.tokenizer import Tokenizer, train_sentencepiece
from megaclip.models import build_model, resolve_model_config
from tests.conftest import ROOT, run_tool, tiny_train_command

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CAPTIONS = ["a small red circle and two large blue squares.", "x", "the " * 100, "",
            "  two  spaces\tand a tab ", "</s> <s> <pad> <unk> as text", "日本 café Ünïcödé"]


def tiny(vocab_size, objective=ObjectiveConfig(), **kw):
    cfg = resolve_model_config(ModelConfig(preset="tiny", **kw), vocab_size=vocab_size)
    model = build_model(cfg, objective, seed=0).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a misplaced one shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return cfg, model


def default_spm(tmp_path):
    """A SentencePiece model with the library's default ids: unk 0, bos 1, eos 2, no pad."""
    import sentencepiece as spm
    text = [f"a {c} {s} and {n} more {c} {s}s" for c in ("red", "green", "blue")
            for s in ("circle", "square", "triangle") for n in ("two", "three", "four")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text * 4), model_prefix=str(tmp_path / "d"),
                                   vocab_size=60, model_type="bpe", minloglevel=2,
                                   hard_vocab_limit=False)
    return str(tmp_path / "d.model")


def hf_folder(tmp_path, spm_path, cfg, model, contrastive="clip"):
    """What export_hf writes, from an in-memory model: transformers' model and tokenizer."""
    import transformers
    with open(spm_path, "rb") as f:
        spm_model = f.read()
    ids = special_ids(spm_model)
    order = (convert.hf_token_order(cfg.text.vocab_size, ids["eos"])
             if convert.hf_architecture(cfg) == "CLIPModel" else None)
    exported = {k: (order[i] if order else i) for k, i in ids.items()}
    arch = convert.hf_architecture(cfg)
    kwargs = convert.hf_config(cfg, contrastive, exported, 2.0)
    hf = getattr(transformers, arch)(getattr(transformers, arch[:-5] + "Config")(**kwargs)).eval()
    hf.load_state_dict(convert.hf_state(model.state_dict(), cfg, order), strict=True)
    names = ("input_ids",) if arch == "SiglipModel" else ("input_ids", "attention_mask")
    text, tok_config = hf_tokenizer(spm_model, cfg.text.context_length, order, names)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "tokenizer.json").write_text(text)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return hf, transformers.AutoTokenizer.from_pretrained(str(out)), order


@pytest.mark.parametrize("spm_source,act", [("megaclip", "gelu"), ("default", "gelu_tanh")])
def test_clip_model_and_tokenizer_match_megaclip(tmp_path, synthetic, spm_source, act):
    spm_path = str(synthetic / "spm.model") if spm_source == "megaclip" else default_spm(tmp_path)
    vocab = Tokenizer(spm_path, 32).vocab_size
    cfg, model = tiny(vocab, vision=VisionConfig(pre_norm=True), act=act)
    hf, hf_tok, order = hf_folder(tmp_path, spm_path, cfg, model)
    tok = Tokenizer(spm_path, cfg.text.context_length)
    tokens, eot = tok.encode(CAPTIONS)
    inputs = hf_tok(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")
    if spm_source == "megaclip":  # pad 0, bos 2, eos 3: the ids as they are
        assert order is None and torch.equal(inputs["input_ids"], tokens)
    else:  # eos 2 would select transformers' legacy argmax pooling: it moves to the last id
        assert tok.eos_id == 2 and order[2] == vocab - 1 and order[vocab - 1] == 2
        assert hf.config.text_config.eos_token_id == vocab - 1
        assert torch.equal(inputs["input_ids"], torch.tensor(order)[tokens])
    images, ours, theirs = same_embeddings(model, hf, tokens, eot, inputs)
    # a SigLIP loss on CLIP's towers: CLIPModel has no bias, the config records it
    ids = {"bos": 2, "eos": 3, "pad": 0}
    assert convert.hf_config(cfg, "siglip", ids, 2.0, -10.0)["megaclip"] == {
        "contrastive": "siglip", "logit_bias": -10.0}


def same_embeddings(model, hf, tokens, eot, inputs):
    """(random images, megaclip's outputs, transformers') on those images and the captions, after checking
    their embeddings agree; transformers' final text norm has the blocks' eps (1e-6),
    megaclip's 1e-5."""
    images = torch.randn(len(CAPTIONS), 3, 64, 64)
    with torch.no_grad():
        ours = model(images=images, tokens=tokens, eot=eot)
        theirs = hf(pixel_values=images, **inputs)
    torch.testing.assert_close(theirs.image_embeds, ours["image_features"], rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs.text_embeds, ours["text_features"], rtol=0, atol=1e-4)
    return images, ours, theirs


SIGLIP_TOWERS = dict(vision=VisionConfig(pool="map"),
                     text=TextConfig(causal=False, pool="last", proj_bias=True))


def test_siglip_towers_match_a_transformers_siglip_model_and_timm(tmp_path):
    import timm
    spm_path = default_spm(tmp_path)  # eos 2: nothing to move, SigLIP pools at the last position
    tok = Tokenizer(spm_path, 32)
    cfg, model = tiny(tok.vocab_size, ObjectiveConfig(contrastive="siglip"), act="gelu_tanh",
                      **SIGLIP_TOWERS)
    assert model.visual.trunk.cls_token is None and model.visual.proj is None
    assert model.text.proj.bias is not None
    with torch.no_grad():
        model.logit_bias.fill_(-3.0)
    hf, hf_tok, order = hf_folder(tmp_path, spm_path, cfg, model, "siglip")
    assert type(hf).__name__ == "SiglipModel" and order is None
    tokens, eot = tok.encode(CAPTIONS)
    inputs = hf_tok(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")
    assert list(inputs) == ["input_ids"] and torch.equal(inputs["input_ids"], tokens)
    images, ours, theirs = same_embeddings(model, hf, tokens, eot, inputs)
    with torch.no_grad():
        logits = (ours["logit_scale"] * ours["text_features"] @ ours["image_features"].T
                  + ours["logit_bias"])
        torch.testing.assert_close(theirs.logits_per_text, logits, rtol=0, atol=1e-3)
        # timm's SigLIP ViT (no class token, attention pooling) holds the image trunk as well
        arch, kwargs = convert.timm_create_kwargs(cfg)
        vit = timm.create_model(arch, **kwargs).eval()
        vit.load_state_dict(convert.timm_vision(model.state_dict()), strict=True)
        torch.testing.assert_close(vit(images), model.visual(images)[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="open_clip export holds CLIP's towers"):
        convert.open_clip_model_config(dataclasses.replace(cfg, act="gelu"), "siglip", 2, 2)


def test_siglip_towers_serve_the_contrastive_objectives_alone():
    from megaclip.config import load_config
    from megaclip.errors import UserError
    towers = ["model.vision.pool=map", "model.text.causal=false", "model.text.pool=last",
              "model.text.proj_bias=true"]
    cfg = load_config("clip_tiny_synthetic", towers + ["objective.contrastive=siglip"])
    assert cfg.model.vision.pool == "map" and not cfg.model.text.causal
    with pytest.raises(UserError, match="model.vision.pool=map has no class token, which "
                                        "objective.preset 'maskclip' reads"):
        load_config("clip_tiny_synthetic", towers + ["objective.preset=maskclip"])
    with pytest.raises(UserError, match="set eval.probes=false"):
        load_config("clip_tiny_synthetic", towers + ["eval.probes=true"])
    with pytest.raises(UserError, match="model.vision.pool must be token or map"):
        load_config(None, ["model.vision.pool=avg"])
    with pytest.raises(UserError, match=r"model.embed_dim \(64\) must be model.vision.width"):
        resolve_model_config(ModelConfig(preset="tiny", embed_dim=64, vision=VisionConfig(
            pool="map")), vocab_size=64)
    # SigLIP's towers with CLIP's pre-norm, or half of them, have no transformers class
    for kw in (dict(vision=VisionConfig(pool="map", pre_norm=True), text=SIGLIP_TOWERS["text"]),
               dict(vision=VisionConfig(pre_norm=True), text=SIGLIP_TOWERS["text"])):
        cfg = resolve_model_config(ModelConfig(preset="tiny", **kw), vocab_size=64)
        with pytest.raises(ValueError, match="export it as timm or safetensors"):
            convert.hf_architecture(cfg)


def test_a_model_without_pre_norm_is_refused():
    cfg = resolve_model_config(ModelConfig(preset="tiny"), vocab_size=64)
    with pytest.raises(ValueError, match="model.vision.pre_norm=true") as e:
        convert.hf_architecture(cfg)
    assert "timm, open_clip or safetensors" in str(e.value)


def test_training_never_imports_transformers():
    code = ("import sys; import megaclip.engine.trainer, megaclip.checkpoint.hf_export, "
            "megaclip.checkpoint.hf_tokenizer; assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _train(ranks, synthetic, out, *extra):
    cmd = tiny_train_command(ranks, synthetic, out, "data.workers=1", "data.shuffle_buffer=16",
                             "optim.warmup_steps=1", "train.steps=2", "train.ckpt_every=2",
                             *extra)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "checkpoints" / "step00000002"


def _export(run, out, *extra):
    """tools/convert_checkpoint.py --verify (--formats hf unless ``extra`` names them), offline;
    the difference it printed for hf."""
    formats = [] if "--formats" in extra else ["--formats", "hf"]
    proc = run_tool("convert_checkpoint.py", str(run), "--out", str(out), *formats, "--verify",
                    *extra, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    found = re.search(r"verify hf: largest absolute difference (\S+) \(ok", proc.stdout)
    assert found, proc.stdout + proc.stderr
    return float(found.group(1)), proc.stdout


def _as_a_user_loads_it(folder, tag, cls_name):
    """transformers' model and tokenizer from the folder against megaclip's checkpoint."""
    import transformers
    from megaclip.checkpoint.inference import load_for_inference
    reference, cfg = load_for_inference(str(tag))
    model = getattr(transformers, cls_name).from_pretrained(str(folder)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    captions = ["a small red circle.", "two large green triangles and a blue square."]
    tokens, eot = Tokenizer(cfg.data.tokenizer, cfg.model.text.context_length).encode(captions)
    inputs = hf_tok(captions, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], tokens)  # megaclip's tokenizers: no id moved
    pixels = torch.randn(2, 3, cfg.model.vision.image_size, cfg.model.vision.image_size)
    with torch.no_grad():
        ours = reference(images=pixels, tokens=tokens, eot=eot)
        theirs = model(pixel_values=pixels, **inputs)
    torch.testing.assert_close(theirs.image_embeds, ours["image_features"], rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs.text_embeds, ours["text_features"], rtol=0, atol=1e-5)
    return model, ours, theirs


@pytest.mark.distributed
@pytest.mark.slow
def test_a_two_rank_zero3_checkpoint_loads_as_a_transformers_clip_model(tmp_path, synthetic):
    tag = _train(2, synthetic, tmp_path / "run", "model.vision.pre_norm=true")
    diff, log = _export(tmp_path / "run", tmp_path / "exported")
    assert diff < 1e-4 and "verify hf: CLIPModel, token ids equal megaclip's" in log
    assert "transformers.CLIPModel.from_pretrained" in log
    _as_a_user_loads_it(tmp_path / "exported" / "hf", tag, "CLIPModel")
    # The same checkpoint as if trained without the pre-norm: refused before anything is written.
    nopre = tmp_path / "nopre" / tag.name
    shutil.copytree(tag, nopre)
    config = nopre / "config.yaml"
    config.write_text(config.read_text().replace("pre_norm: true", "pre_norm: false"))
    proc = run_tool("convert_checkpoint.py", str(nopre), "--out", str(tmp_path / "refused"),
                    "--formats", "hf", check=False)
    assert proc.returncode == 2 and "model.vision.pre_norm=true" in proc.stderr, proc.stderr
    assert "timm, open_clip or safetensors" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_a_siglip_run_loads_as_a_transformers_siglip_model(tmp_path, synthetic):
    """SigLIP's towers and loss, trained (one rank) with the in-training evaluation, which has no
    class token to draw patch maps from; exported with its scale and bias, and to timm."""
    tag = _train(1, synthetic, tmp_path / "run", "objective.contrastive=siglip",
                 "model.vision.pool=map", "model.text.causal=false", "model.text.pool=last",
                 "model.text.proj_bias=true", "model.act=gelu_tanh",
                 f"eval.shards={synthetic}/eval/shard-000000.tar",
                 f"eval.classes={synthetic}/eval/classes.json")
    assert (tmp_path / "run" / "eval_step00000002.json").exists()
    diff, log = _export(tmp_path / "run", tmp_path / "exported", "--formats", "hf,timm")
    assert diff < 1e-4 and "verify hf: SiglipModel, token ids equal megaclip's" in log
    assert re.search(r"verify timm \(student\): largest absolute difference \S+ \(ok", log)
    model, ours, theirs = _as_a_user_loads_it(tmp_path / "exported" / "hf", tag, "SiglipModel")
    logits = (ours["logit_scale"] * ours["text_features"] @ ours["image_features"].T
              + ours["logit_bias"])
    torch.testing.assert_close(theirs.logits_per_text, logits, rtol=0, atol=1e-4)
    assert float(model.logit_bias.detach()) == float(ours["logit_bias"].detach()) != 0
