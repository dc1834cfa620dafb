"""Reading and converting pretrained open_clip and timm files (model.init_from) into a model
built without ZeRO: the embeddings are open_clip's and timm's, and every file or architecture
that would load wrongly is refused naming what to change."""
import json
import os

import pytest
import torch

from megaclip.checkpoint import convert, convert_in, pretrained
from megaclip.config import load_config
from megaclip.engine.init_from import load_init_weights, model_shapes
from megaclip.errors import UserError
from megaclip.models import build_model
from tests.open_clip_files import batch, experiment, open_clip_embeddings, save_open_clip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip")
    return folder, save_open_clip(folder)


def built(cfg):
    return build_model(cfg.model, cfg.objective, seed=0).eval()


@pytest.mark.parametrize("name", ["open_clip_pytorch_model.bin", ""])  # "": the folder, whose
# open_clip_model.safetensors comes first
def test_open_clip_file_gives_open_clip_embeddings(files, name):
    folder, oc_model = files
    cfg = experiment(f"model.init_from={os.path.join(folder, name)}")
    model = built(cfg)
    report = load_init_weights(model, cfg.model)
    print("\n".join(report))
    assert "(open_clip, float32, 98 tensors): loaded 98 into image, text, logit_scale" in report[0]
    assert report[1] == "init_from: missing 0 (left at their init)"
    assert "open_clip_config.json says quick_gelu: true" in report[3]
    assert "text position embeddings cut from a context of 32 to the first 24" in report[-1]
    images, tokens, eot = batch()
    with torch.no_grad():
        out = model(images=images, tokens=tokens, eot=eot)
    image, text = open_clip_embeddings(oc_model, images, tokens)
    image_diff = (image - out["image_features"]).abs().max().item()
    text_diff = (text - out["text_features"]).abs().max().item()
    print(f"{name or 'folder'}: max abs diff image {image_diff:.3g}, text {text_diff:.3g}")
    assert image_diff < 1e-5 and text_diff < 1e-4  # open_clip's final text norm: eps 1e-6
    assert torch.isclose(out["logit_scale"], torch.tensor(2.0).exp())


def test_timm_vit_loads_the_image_trunk_only_and_resamples_its_grid(tmp_path):
    import timm
    from safetensors.torch import save_file
    cfg = experiment()
    arch, kwargs = convert.timm_create_kwargs(cfg.model)
    vit = timm.create_model(arch, **{**kwargs, "img_size": 56}).eval()  # a 7x7 grid, not 8x8
    with torch.no_grad():  # no value left as megaclip would draw it (norms at 1, biases at 0)
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_file(vit.state_dict(), str(tmp_path / "model.safetensors"))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"architecture": arch, "model_args": {"act_layer": "quick_gelu"}}, f)
    cfg = experiment(f"model.init_from={tmp_path}")
    model, fresh = built(cfg), built(cfg)
    report = load_init_weights(model, cfg.model)
    print("\n".join(report))
    assert "(timm_vit, float32," in report[0] and "into image" in report[0]
    assert "resampled from a 7x7 to a 8x8 patch grid" in report[-1]
    state, before = model.state_dict(), fresh.state_dict()
    for name in state:  # the image trunk loaded, the rest (projection, text tower) as built
        assert torch.equal(state[name], before[name]) != name.startswith("visual.trunk."), name
    vit.set_input_size((64, 64))  # timm's own resampling: the same position embeddings
    torch.testing.assert_close(state["visual.trunk.pos_embed"], vit.pos_embed)
    images = batch()[0]
    with torch.no_grad():
        torch.testing.assert_close(model.visual.trunk(images), vit.forward_features(images),
                                   rtol=0, atol=1e-5)


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    class Crafted:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'MARKER'}",)

    torch.save({"visual.conv1.weight": Crafted()}, tmp_path / "open_clip_pytorch_model.bin")
    cfg = experiment(f"model.init_from={tmp_path}")
    with pytest.raises(UserError, match="holds objects megaclip does not load .*refusing to run "
                                        "code from it"):
        load_init_weights(built(cfg), cfg.model)
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("where", ["hf-hub:timm/vit_base_patch16_clip_224.openai",
                                   "https://example.com/open_clip_model.safetensors"])
def test_network_names_are_refused(where):
    with pytest.raises(UserError, match="local file or folder.*no network at run time"):
        load_config("clip_tiny_synthetic", [f"model.init_from={where}"])


def test_mismatches_are_refused_naming_the_option(files, tmp_path):
    folder, _ = files
    state = pretrained.read_weights(str(folder / "open_clip_model.safetensors"))

    def refused(match, *overrides, state=state, arch=True):
        cfg = experiment(*overrides, arch=arch)
        with pytest.raises(UserError, match=match):
            convert_in.from_pretrained(state, model_shapes(built(cfg)), cfg.model,
                                       cfg.model.init_from_towers)

    refused("has a pre-norm .*set model.vision.pre_norm=true", "model.act=quick_gelu", arch=False)
    refused(r"context of 32 tokens, the model 40: set model.text.context_length=32",
            "model.text.context_length=40")
    refused("4 blocks .*set model.vision.depth=4", "model.vision.depth=6")
    bigger = dict(state, **{"text.token_embedding.weight": torch.zeros(256, 128)})
    refused("tokenizer it was trained with.*text.token_embedding.weight: file .256, 128., model "
            ".128, 128.", state=bigger)
    scaled = dict(state, **{"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(128)})
    refused("no place for .*resblocks.0.ls_1.gamma", state=scaled)
    refused("asks for text, but the file", "model.init_from_towers=[text]", "model.init_from=x",
            state={k: v for k, v in state.items() if k.startswith("visual.")})
    # a CLIP text tower into SigLIP's (bidirectional, read at the last position) and back
    refused("file's text tower is CLIP's .*model's is SigLIP's", "model.text.causal=false",
            "model.text.pool=last")
    siglip_text = dict(state, **{"text.text_projection.weight": state["text.text_projection"].T,
                                 "text.text_projection.bias": torch.zeros(128)})
    del siglip_text["text.text_projection"]
    refused("file's text tower is SigLIP's .*model's is CLIP's", state=siglip_text)
    cfg = experiment("model.act=gelu", f"model.init_from={folder}")  # the config says quick_gelu
    with pytest.raises(UserError, match="use quick_gelu .*set model.act=quick_gelu"):
        load_init_weights(built(cfg), cfg.model)


def test_init_from_towers_loads_only_what_it_names(files):
    folder, _ = files
    cfg = experiment(f"model.init_from={folder}", "model.init_from_towers=[image]")
    model, fresh = built(cfg), built(cfg)
    report = load_init_weights(model, cfg.model)
    assert "loaded 56 into image" in report[0] and "unused 42" in report[2]
    state, before = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in state if not k.startswith("visual."))
    assert torch.equal(state["visual.trunk.patch_embed.proj.weight"],
                       pretrained.read_weights(str(folder / "open_clip_model.safetensors"))[
                           "visual.conv1.weight"])
