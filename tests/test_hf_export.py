"""The transformers export: CLIPModel (and its tokenizer) give megaclip's embeddings and token ids,
an end-of-text id 2 is moved off transformers' legacy pooling, a model without CLIP's pre-norm is
refused, and a 2-rank ZeRO-3 checkpoint goes through tools/convert_checkpoint.py --formats hf."""
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
from megaclip.config import ModelConfig, ObjectiveConfig, VisionConfig
from megaclip.data.tokenizer import Tokenizer, train_sentencepiece
from megaclip.models import build_model, resolve_model_config
from tests.conftest import ROOT, launch_prefix, run_tool

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
    order = convert.hf_token_order(cfg.text.vocab_size, ids["eos"])
    exported = {k: (order[i] if order else i) for k, i in ids.items()}
    kwargs = convert.hf_clip_config(cfg, contrastive, exported, 2.0)
    hf = transformers.CLIPModel(transformers.CLIPConfig(**kwargs)).eval()
    hf.load_state_dict(convert.hf_clip_state(model.state_dict(), cfg, order), strict=True)
    text, tok_config = hf_tokenizer(spm_model, cfg.text.context_length, order)
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
    images = torch.randn(len(CAPTIONS), 3, 64, 64)
    with torch.no_grad():
        ours = model(images=images, tokens=tokens, eot=eot)
        theirs = hf(pixel_values=images, **inputs)
    torch.testing.assert_close(theirs.image_embeds, ours["image_features"], rtol=0, atol=1e-5)
    # transformers' final text norm has the blocks' eps (1e-6), megaclip's 1e-5
    torch.testing.assert_close(theirs.text_embeds, ours["text_features"], rtol=0, atol=1e-4)


def test_a_model_without_pre_norm_is_refused():
    cfg = resolve_model_config(ModelConfig(preset="tiny"), vocab_size=64)
    with pytest.raises(ValueError, match="model.vision.pre_norm=true") as e:
        convert.hf_architecture(cfg)
    assert "timm, open_clip or safetensors" in str(e.value)


def _train(ranks, synthetic, out, *extra):
    cmd = [*launch_prefix(ranks), "megaclip/train.py", "--deepspeed_config",
           "ds_configs/zero3_cpu.json", "--config", "clip_tiny_synthetic",
           f"data.train_shards={synthetic}/train/shard-{{000000..000003}}.tar",
           f"data.tokenizer={synthetic}/spm.model", 'eval.shards=""', f"train.output_dir={out}",
           f"train.micro_batch_size={8 // ranks}", "train.log_every=1", "data.workers=1",
           "data.shuffle_buffer=16", "optim.warmup_steps=1", "train.steps=2",
           "train.ckpt_every=2", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "checkpoints" / "step00000002"


def _export(run, out, *extra):
    """tools/convert_checkpoint.py --formats hf --verify, offline; the difference it printed."""
    proc = run_tool("convert_checkpoint.py", str(run), "--out", str(out), "--formats", "hf",
                    "--verify", *extra, env={**os.environ, "HF_HUB_OFFLINE": "1"})
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
    assert diff < 1e-4 and "verify hf: token ids equal megaclip's" in log
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
