import math

import pytest
import torch

from megaclip.config import ModelConfig, ObjectiveConfig, load_config
from megaclip.objectives.flops import forward_flops_per_sample
from megaclip.engine.optim import param_groups
from megaclip.eval.zeroshot import recall_at_k
from megaclip.models import build_model, resolve_model_config


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


@pytest.mark.parametrize("preset, visual, text", [
    ("clip", 1, 1), ("clip@objective.contrastive=siglip", 1, 1),
    ("maskclip", 2, 2),  # whole + masked view; caption + masked caption
    ("maskclip_flip", 1, 2),  # the contrastive loss reads the masked pass
    ("silc", 2, 1),  # global views + local crops
    ("maskclip+silc", 3, 2)])
def test_every_block_runs_once_per_training_forward_whatever_the_passes(preset, visual, text):
    """Each tower takes all of its inputs in one call: every block of the towers and decoders
    runs once per training forward (so each can be a ZeRO-3 leaf module), with the gradients of
    every pass."""
    from megaclip.data.masks import masking_for
    preset, *more = preset.split("@")
    cfg = load_config(None, [f"objective.preset={preset}", "model.preset=tiny", *more])
    obj = cfg.objective
    assert (obj.passes.tower_passes("visual"), obj.passes.tower_passes("text")) == (visual, text)
    mcfg = resolve_model_config(cfg.model, vocab_size=64)
    model = build_model(mcfg, obj, seed=0).train()
    calls = {}
    for group, blocks in model.leaf_blocks().items():
        for i, blk in enumerate(blocks):
            blk.register_forward_pre_hook(
                lambda m, a, key=(group, i): calls.__setitem__(key, calls.get(key, 0) + 1))
    out = model(**_batch(model, obj, mcfg))
    assert calls and set(calls.values()) == {1}, calls
    assert {g for g, _ in calls} == set(model.leaf_blocks())
    loss = sum(v.float().sum() for k, v in out.items() if v.requires_grad)
    loss.backward()
    assert all(p.grad is not None for p in model.visual.trunk.blocks[0].parameters())


def _batch(model, obj, mcfg, B=2):
    """A training batch for ``obj`` on the tiny model: views, masks, masked caption."""
    S, L = mcfg.vision.image_size, mcfg.text.context_length
    n = (S // mcfg.vision.patch_size) ** 2
    batch = {"images": torch.randn(B, 3, S, S), "tokens": torch.randint(0, 64, (B, L)),
             "eot": torch.tensor([5, 9][:B])}
    if obj.passes.masked_image:
        keep = n - int(n * obj.mask.ratio)
        order = torch.stack([torch.randperm(n) for _ in range(B)])
        batch["keep_index"], batch["masked_index"] = order[:, :keep].sort(1)[0], order[:, keep:].sort(1)[0]
    if obj.passes.full_views > 1:
        batch["views"] = torch.randn(B, obj.passes.full_views - 1, 3, S, S)
    if obj.passes.local_views:
        s = obj.local_global.local_size
        batch["local_views"] = torch.randn(B, obj.passes.local_views, 3, s, s)
    if obj.passes.masked_caption:
        embed = torch.zeros(B, L, dtype=torch.bool)
        embed[:, 1:3] = True
        batch.update(mlm_tokens=batch["tokens"].clone(), mlm_embed=embed,
                     mlm_index=torch.tensor([[1, 2]] * B), mlm_valid=torch.ones(B, 2, dtype=torch.bool))
    return batch


def test_a_leaf_block_run_twice_in_a_training_forward_is_named():
    """The guard beside the ZeRO-3 leaf blocks: a second call of a leaf tower's blocks with
    gradients is a clear error; one call, or two without gradients (evaluation), are not."""
    from megaclip.zero3 import _check_leaves_run_once
    _, model = tiny()
    model.train()
    _check_leaves_run_once(model, {"visual": model.tower_blocks("visual")})
    images = torch.randn(2, 3, 64, 64)
    model(images=images)
    def visual_again(module, args):
        model.visual(images)  # (returns None: the text tower's inputs stay)
    again = model.text.register_forward_pre_hook(visual_again)
    with torch.no_grad():
        model(images=images, tokens=torch.randint(0, 64, (2, 32)), eot=torch.tensor([3, 4]))
    with pytest.raises(RuntimeError, match="the blocks of visual ran more than once"):
        model(images=images, tokens=torch.randint(0, 64, (2, 32)), eot=torch.tensor([3, 4]))
    again.remove()
    model(images=images)  # counted afresh each forward
