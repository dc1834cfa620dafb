"""model.init_from under ZeRO-3 (one in-process rank): the engine's model gives open_clip's
embeddings before the first step, the EMA teacher starts from the loaded trunk, DeepSpeed's
parameter groups step at scale x schedule."""
import os

import pytest
import torch

from megaclip.checkpoint import convert_in, pretrained
from megaclip.engine.schedules import warmup_cosine
from tests.conftest import ROOT
from tests.open_clip_files import batch, experiment, open_clip_embeddings, save_open_clip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip")
    return folder, save_open_clip(folder)


def _training(folder, *overrides):
    from megaclip.engine.assembly import build_training
    from megaclip.engine.ds_config import load_ds_config
    cfg = experiment(f"model.init_from={folder}", "train.micro_batch_size=4", *overrides)
    ds = load_ds_config(os.path.join(ROOT, "ds_configs", "zero3_cpu.json"))
    return cfg, build_training(cfg, ds, 1, torch.device("cpu"))


def test_zero3_model_gives_open_clip_embeddings_and_groups_step_at_scale_x_schedule(
        process_group, files):
    from deepspeed.utils import safe_get_full_fp32_param
    from megaclip.engine.optim import set_lr
    from megaclip.engine.step import train_step
    folder, oc_model = files
    cfg, training = _training(folder, "optim.layer_decay=0.75", "optim.weight_decay=0")
    engine, module = training.engine, training.engine.module
    assert all(hasattr(p, "ds_id") for p in module.parameters())  # built partitioned
    assert any("loaded 98 into image, text, logit_scale" in n for n in training.notes)
    images, tokens, eot = batch(4)
    module.eval()
    with torch.no_grad():
        out = module(images=images, tokens=tokens, eot=eot)
    image, text = open_clip_embeddings(oc_model, images, tokens)
    image_diff = (image - out["image_features"]).abs().max().item()
    text_diff = (text - out["text_features"]).abs().max().item()
    print(f"ZeRO-3, before the first step: max abs diff image {image_diff:.3g}, text {text_diff:.3g}")
    assert image_diff < 1e-5 and text_diff < 1e-4
    # One step through DeepSpeed's optimiser: each group's lr is scale x schedule, and Adam's
    # first step moves its fp32 masters by that much at most.
    groups = training.optimizer.param_groups
    assert len(groups) == 22 and {"lr_scale", "name"} <= set(groups[0])
    lr = warmup_cosine(3, cfg.train.steps, cfg.optim.lr, cfg.optim.warmup_steps)
    set_lr(training.optimizer, lr)
    names = {id(p): n for n, p in module.named_parameters()}
    probe = {"visual.trunk.cls_token": 0.75 ** 5, "visual.trunk.blocks.1.attn.qkv.weight": 0.75 ** 3,
             "text.blocks.2.mlp.fc1.weight": 0.75, "text.proj.weight": 1.0}
    params = {names[id(p)]: p for p in module.parameters() if names[id(p)] in probe}
    before = {n: safe_get_full_fp32_param(p).clone() for n, p in params.items()}
    module.train()
    train_step(engine, training.objective, {"images": images, "tokens": tokens, "eot": eot})
    for group in groups:
        assert group["lr"] == pytest.approx(group["lr_scale"] * lr)
    for name, p in params.items():
        moved = (safe_get_full_fp32_param(p) - before[name]).abs().max().item()
        assert moved == pytest.approx(probe[name] * lr, rel=1e-3), name


def test_the_ema_teacher_starts_from_the_loaded_trunk(process_group, files):
    folder, _ = files
    cfg, training = _training(folder, "objective.preset=maskclip",
                              "objective.mask_distill.prototypes=64")
    file_state = pretrained.read_weights(str(folder / "open_clip_model.safetensors"))
    shapes = {n: tuple(p.ds_shape) for n, p in training.engine.module.named_parameters()}
    loaded = convert_in.from_pretrained(file_state, shapes, cfg.model).state
    ema = training.teacher.state_dict()  # one rank: the whole of each (flat) tensor
    trunk = [k for k in ema if k.startswith("trunk.")]
    assert len(trunk) == 55  # the image tower but its projection
    for key in trunk:
        want = loaded["visual." + key].reshape(-1)
        assert torch.equal(ema[key].reshape(-1)[:want.numel()], want), key
