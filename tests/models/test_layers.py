"""Locked towers (LiT) lock what open_clip's own lock does; layer decay gives each group the
learning rate scale x schedule, and one optimiser step moves each group by its own rate."""
import pytest
import torch

from megaclip.checkpoint import convert_in
from megaclip.config import load_config
from megaclip.engine.init_from import model_shapes
from megaclip.engine.optim import (build_optimizer, check_group_layout, param_groups, set_lr)
from megaclip.engine.schedules import warmup_cosine
from megaclip.errors import UserError
from megaclip.models import build_model
from megaclip.models.layers import check_locks, depths, lock_towers
from tests.open_clip_files import experiment, open_clip_model


@pytest.mark.parametrize("image,text", [(0, 0), (1, 2), (2, 4), (5, 1), (6, 5)])
def test_locks_are_open_clips(image, text):
    """The same parameters stay trainable as open_clip's lock_image_tower(unlocked_groups) and
    lock_text_tower(unlocked_layers) leave trainable, name for name (depths 4 and 3: 6 and 5
    groups)."""
    cfg = experiment("model.lock_image=true", "model.lock_text=true",
                     f"model.lock_image_unlocked_groups={image}",
                     f"model.lock_text_unlocked_layers={text}")
    model = build_model(cfg.model, cfg.objective, seed=0)
    lock_towers(model, cfg.model)
    oc, _ = open_clip_model()
    oc.lock_image_tower(unlocked_groups=image)
    oc.lock_text_tower(unlocked_layers=text)
    theirs = {n: p.requires_grad for n, p in oc.named_parameters()}
    sources = convert_in.from_pretrained(oc.state_dict(), model_shapes(model), cfg.model).sources
    ours = dict(model.named_parameters())
    assert len(sources) == 98
    for name, source in sources.items():
        assert ours[name].requires_grad == theirs[source], (name, source)
    assert ours["logit_scale"].requires_grad


def test_layer_decay_scales_and_the_default_groups():
    cfg = experiment("optim.layer_decay=0.75", "optim.weight_decay=0.0")
    model = build_model(cfg.model, cfg.objective, seed=0)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.1, 0.75, depths(cfg.model))
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert len(scale) == len(names)
    want = {"visual.trunk.cls_token": 0.75 ** 5, "visual.trunk.patch_embed.proj.weight": 0.75 ** 5,
            "visual.trunk.norm_pre.weight": 0.75 ** 5, "visual.trunk.blocks.0.mlp.fc1.weight":
            0.75 ** 4, "visual.trunk.blocks.3.norm1.bias": 0.75, "visual.trunk.norm.weight": 1.0,
            "visual.proj.weight": 1.0, "text.token_embedding.weight": 0.75 ** 4,
            "text.positional_embedding": 0.75 ** 4, "text.blocks.0.attn.qkv.weight": 0.75 ** 3,
            "text.blocks.2.attn.qkv.weight": 0.75, "text.ln_final.weight": 1.0,
            "text.proj.weight": 1.0, "logit_scale": 1.0}
    for name, value in want.items():
        assert scale[name] == pytest.approx(value), name
    # Off (the default): the two groups of every earlier run, no scale.
    plain = param_groups(model, 0.1)
    assert [g["name"] for g in plain] == ["decay", "no_decay"]
    assert not any("lr_scale" in g for g in plain)


def test_one_step_moves_each_group_by_its_scale_times_the_schedule():
    """Adam's first step moves every element by lr x g / (|g| + eps): the largest move in each
    group is its learning rate (no weight decay)."""
    cfg = experiment("optim.layer_decay=0.75")
    model = build_model(cfg.model, cfg.objective, seed=0)
    groups = param_groups(model, 0.0, 0.75, depths(cfg.model))
    opt, _ = build_optimizer(cfg.optim, groups, "cpu")
    step = 5
    lr = warmup_cosine(step, cfg.train.steps, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr)
    set_lr(opt, lr)
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(group["lr_scale"] * lr)
    before = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
    images, tokens = torch.randn(4, 3, 64, 64), torch.randint(3, 128, (4, 24))
    out = model(images=images, tokens=tokens, eot=torch.tensor([5, 9, 12, 23]))
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    opt.step()
    moves = []
    for group, old in zip(opt.param_groups, before):
        moved = max((p.detach() - o).abs().max().item() for p, o in zip(group["params"], old))
        assert moved == pytest.approx(group["lr_scale"] * lr, rel=1e-3), group["name"]
        moves.append(f"{group['name']} {group['lr_scale']:.4g} x {lr:.4g} = {group['lr']:.4g}: "
                     f"{moved:.4g}")
    print("group scale x schedule = lr: largest move; " + "; ".join(moves))


def test_a_locked_trunk_under_the_ema_teacher_is_refused():
    cfg = experiment("objective.preset=maskclip", "model.lock_image=true")
    with pytest.raises(UserError, match="lock_image=true with objective 'maskclip'.*"
                                        "lock_image_unlocked_groups=6"):
        check_locks(cfg.model, cfg.objective)
    check_locks(experiment("objective.preset=maskclip", "model.lock_text=true").model,
                cfg.objective)
    check_locks(experiment("model.lock_image=true").model, experiment().objective)


@pytest.mark.parametrize("override,match", [
    ("model.lock_image_unlocked_groups=2", "needs model.lock_image=true"),
    ("optim.layer_decay=1.5", "optim.layer_decay must be in"),
    ("model.init_from_towers=[vision]", "init_from_towers takes distinct names"),
    ("model.init_from_towers=[image]", "needs model.init_from")])
def test_config_refuses(override, match):
    with pytest.raises(UserError, match=match):
        load_config("clip_tiny_synthetic", [override])


def test_a_checkpoint_with_other_groups_is_refused_on_resume(tmp_path):
    from megaclip.config import save_resolved
    save_resolved(experiment("model.lock_image=true"), str(tmp_path / "config.yaml"))
    check_group_layout(str(tmp_path), experiment("model.lock_image=true", "optim.layer_decay=1"))
    with pytest.raises(UserError, match="model.lock_image=True.*this run has model.lock_image="
                                        "False"):
        check_group_layout(str(tmp_path), experiment())
    with pytest.raises(UserError, match="optim.layer_decay=1 .off.*optim.layer_decay=on"):
        check_group_layout(str(tmp_path), experiment("model.lock_image=true",
                                                     "optim.layer_decay=0.9"))
