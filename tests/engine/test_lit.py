"""LiT through train.py at world size 2 under ZeRO-3: a run that loads an open_clip file and
locks the image tower keeps that tower bit for bit while the text tower trains, with
DeepSpeed's groups at scale x schedule; resumed at 1 rank (DeepSpeed's universal checkpoint,
which leaves locked parameters out) without the file, it takes its checkpoint's weights."""
import json
import shutil
import subprocess

import pytest
import torch

from megaclip.checkpoint import convert_in, pretrained
from megaclip.engine.schedules import warmup_cosine
from tests.conftest import ROOT, tiny_train_command
from tests.open_clip_files import batch, experiment, open_clip_embeddings, save_open_clip


def _train(ranks, synthetic, out, *extra):
    cmd = tiny_train_command(ranks, synthetic, out, "data.workers=0", "data.shuffle_buffer=16",
                             "train.ckpt_every=0", "train.steps=3", "model.vision.pre_norm=true",
                             "model.act=quick_gelu", *extra)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    return proc, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_lit_at_world_size_2_keeps_the_loaded_image_tower_and_resumes_without_the_file(
        synthetic, tmp_path):
    from megaclip.checkpoint.io import consolidate
    from megaclip.checkpoint.safe_load import weights_only_loads
    from megaclip.models import build_model
    init = tmp_path / "init"
    oc_model = save_open_clip(init)
    out = tmp_path / "run"
    proc, log = _train(2, synthetic, out, f"model.init_from={init}", "model.lock_image=true",
                       "optim.layer_decay=0.8", "--stop_after_steps", "2")
    assert proc.returncode == 0, log[-4000:]
    assert "loaded 98 into image, text, logit_scale" in log and "missing 0" in log, log[-4000:]
    assert "image tower locked: 56 parameter tensors get no updates" in log
    # The file goes away: the resumed run (at 1 rank: DeepSpeed's universal checkpoint, which
    # leaves locked parameters out) must not need it.
    shutil.move(init, tmp_path / "moved")
    proc, log = _train(1, synthetic, out, f"model.init_from={init}", "model.lock_image=true",
                       "optim.layer_decay=0.8", "--resume", "auto")
    assert proc.returncode == 0, log[-4000:]
    assert "not read: the run resumes from a checkpoint" in log and "loaded 98" not in log
    cfg = experiment()
    model = build_model(cfg.model, cfg.objective, seed=0).eval()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    loaded = convert_in.from_pretrained(pretrained.read_weights(
        str(tmp_path / "moved" / "open_clip_model.safetensors")), shapes, cfg.model).state
    for step in (2, 3):
        state = consolidate(str(out / "checkpoints" / f"step{step:08d}"))
        image = [k for k in state if k.startswith("visual.")]
        assert len(image) == 56 and all(torch.equal(state[k], loaded[k].reshape(state[k].shape))
                                        for k in image), step
        moved = max((state[k] - loaded[k].reshape(state[k].shape)).abs().max().item()
                    for k in state if k.startswith("text."))
        print(f"step {step}: image tower bit-identical to the file's ({len(image)} tensors); "
              f"text tower moved up to {moved:.3g}")
        assert moved > 0
    model.load_state_dict(state)
    images, tokens, eot = batch(4)
    with torch.no_grad():
        image = model(images=images)["image_features"]
    diff = (open_clip_embeddings(oc_model, images, tokens)[0] - image).abs().max().item()
    print(f"step 3 image embeddings vs open_clip's: max abs diff {diff:.3g}")
    assert diff < 1e-5
    # DeepSpeed's groups as saved at step 2: lr = scale x the schedule of the last step taken.
    with weights_only_loads():
        saved = torch.load(out / "checkpoints" / "step00000002" /
                           "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=True)
    groups = saved["optimizer_state_dict"]["optimizer_state_dict"]["param_groups"]
    lr = warmup_cosine(1, 3, cfg.optim.lr, cfg.optim.warmup_steps)
    assert len(groups) == 10 and not any(g["name"].startswith("image") for g in groups)
    for group in groups:
        assert group["lr"] == pytest.approx(group["lr_scale"] * lr), group["name"]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
