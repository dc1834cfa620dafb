import math

import pytest
import torch

from megaclip.config import ModelConfig, ObjectiveConfig, load_config
from megaclip.objectives.flops import forward_flops_per_sample
from megaclip.engine.optim import param_groups
from megaclip.eval.zeroshot import recall_at_k
from megaclip.models import build_model, resolve_model_config
from megaclip.objectives.terms import towers_run_once


def tiny(**kw):
    cfg = resolve_model_config(ModelConfig(preset="tiny", **kw), vocab_size=64)
    return cfg, build_model(cfg, ObjectiveConfig(), seed=0)


def test_forward_gives_normalised_features_and_clamped_scale():
    cfg, model = tiny(init_logit_scale=1000.0)
    out = model(images=torch.randn(3, 3, 64, 64), tokens=torch.randint(0, 64, (3, 32)),
                eot=torch.tensor([5, 9, 31]))
    assert out["image_features"].shape == (3, 128) == out["text_features"].shape
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(3))
    assert math.isclose(out["logit_scale"].item(), 100.0, rel_tol=1e-5)  # clamped in forward


def test_text_feature_is_read_at_end_of_text_and_is_causal():
    _, model = tiny()
    model.eval()
    tokens = torch.randint(0, 64, (1, 32))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 64  # only after the end-of-text position 9
    a = model(tokens=tokens, eot=torch.tensor([9]))["text_features"]
    b = model(tokens=changed, eot=torch.tensor([9]))["text_features"]
    torch.testing.assert_close(a, b)


def test_weight_decay_groups():
    _, model = tiny()
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.5)
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "visual.trunk.cls_token", "visual.trunk.pos_embed",
            "text.token_embedding.weight", "text.positional_embedding"} <= nd
    assert all(n.endswith(("bias", "weight")) for n in nd if "norm" in n or "ln" in n)
    d = {names[id(p)] for p in decay["params"]}
    assert "visual.proj.weight" in d and "text.blocks.0.attn.qkv.weight" in d
    assert not any(n.endswith(".bias") for n in d)


def test_same_seed_same_weights():
    _, a = tiny()
    _, b = tiny()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_vit_b16_flops_match_the_known_figure():
    cfg = resolve_model_config(ModelConfig(preset="vit_b16"), vocab_size=49408)
    v = cfg.vision
    image_only = forward_flops_per_sample(cfg) - forward_flops_per_sample(
        resolve_model_config(ModelConfig(preset="vit_b16", vision=type(v)(depth=0)), 49408))
    # ViT-B/16 at 224 px: about 17.6 GMACs = 35 GFLOPs in its 12 blocks.
    assert 33e9 < image_only < 37e9


def test_recall_at_k():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.0], [0.0, 0.1, 0.2]])
    r = recall_at_k(sim, ks=(1, 2))
    assert math.isclose(r[1], 2 / 3, rel_tol=1e-6) and r[2] == 1.0


@pytest.mark.parametrize("preset, once", [
    ("clip", ("visual", "text")),
    ("maskclip", ()),  # masked + full student passes; caption + masked caption
    ("maskclip_flip", ("visual",)),  # the contrastive loss reads the masked pass
    ("silc", ("text",)),  # global crops + local crops
    ("maskclip+silc", ())])
def test_towers_run_once_per_objective(preset, once):
    """The towers marked as ZeRO-3 leaf blocks: exactly those TwoTower.forward runs once."""
    assert towers_run_once(load_config(None, [f"objective.preset={preset}"]).objective) == once


def test_silc_without_local_crops_runs_the_image_tower_once():
    cfg = load_config(None, ["objective.preset=silc", "objective.local_global.local_crops=0"])
    assert towers_run_once(cfg.objective) == ("visual", "text")


def test_siglip_runs_each_tower_once():
    cfg = load_config(None, ["objective.contrastive=siglip"])
    assert towers_run_once(cfg.objective) == ("visual", "text")


def test_a_leaf_tower_run_twice_in_a_training_forward_is_named():
    """The guard beside the ZeRO-3 leaf blocks: a second pass of a leaf tower with gradients is a
    clear error; one pass, or two without gradients (evaluation), are not."""
    from megaclip.zero3 import _check_leaves_run_once
    _, model = tiny()
    model.train()
    _check_leaves_run_once(model, {"visual": model.tower_blocks("visual")})
    images = torch.randn(2, 3, 64, 64)
    keep = torch.arange(16).expand(2, 16)
    model(images=images)
    with torch.no_grad():
        model(images=images, keep_index=keep)  # masked and full pass
    with pytest.raises(RuntimeError, match="visual tower ran more than once"):
        model(images=images, keep_index=keep)
    model(images=images)  # counted afresh each forward
