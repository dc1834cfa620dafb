"""End to end through `deepspeed megaclip/train.py` at world size 2 with the teacher objectives
(maskclip+silc: masks, caption masks and multi-crop views from one teacher; silc under gradient
accumulation): a run stopped after a checkpoint and resumed with --resume auto ends with the
same parameters and the same EMA teacher as an uninterrupted one; the teacher moves once per
optimiser step; tools/eval.py on the checkpoint reproduces the in-training evaluation."""
import json
import os
import subprocess
import sys

import pytest
import torch

from megaclip.checkpoint.io import consolidate
from megaclip.teacher.state import consolidate_teacher
from megaclip.teacher.ema import PREFIXES
from tests.conftest import ROOT, free_port, run_tool, shared_memory_buffers, synthetic_overrides


# Per preset: the settings of its runs. silc: micro-batches of 4 accumulated twice, a fixed
# teacher momentum of 0.9 and a checkpoint after every step (all kept), so that consecutive
# checkpoints show how far the teacher moved in one optimiser step.
SETTINGS = {
    "maskclip+silc": ["objective.preset=maskclip+silc", "train.micro_batch_size=8"],
    "silc": ["objective.preset=silc", "train.micro_batch_size=4", "train.grad_accum_steps=2",
             "train.ckpt_every=1", "train.keep_checkpoints=0", "objective.teacher.momentum=0.9",
             "objective.teacher.momentum_end=0.9"],
}


def train(out, synthetic, *extra):
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "megaclip/train.py",
           "--deepspeed_config", "ds_configs/zero3_cpu.json", "--config", "clip_tiny_synthetic",
           *synthetic_overrides(synthetic, out), "train.steps=6", "train.ckpt_every=3",
           "train.log_every=1", "data.workers=2", "data.shuffle_buffer=30",
           "optim.warmup_steps=2", "objective.mask_distill.prototypes=64",
           "objective.local_global.prototypes=64", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("preset", list(SETTINGS))
def test_stop_and_resume_equals_uninterrupted(tmp_path, synthetic, preset):
    a, b = tmp_path / "a", tmp_path / "b"
    shm_before = shared_memory_buffers()
    log_a = train(a, synthetic, *SETTINGS[preset], "train.peak_tflops=2.0",
                  f"eval.probes={str(preset == 'maskclip+silc').lower()}",
                  "eval.probe_encoder=teacher")
    # Honest throughput: data wait, MFU against the given peak, an ETA from the first line on.
    first = next(line for line in log_a.splitlines() if line.startswith("step 1/6 "))
    assert "| data_time_s " in first and "| mfu " in first and not first.endswith("eta 0s")
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for r in train_rows:
        assert r["train/step_time_s"] > r["train/data_time_s"] >= 0
        assert abs(r["train/mfu"] - r["train/tflops_per_device"] / 2.0) < 1e-9
        assert r["train/teacher_update_rms"] > 0
        assert 0 < r["train/global_teacher_batch_entropy"]  # SILC's statistics logged
        assert 0 < r["train/global_teacher_entropy"] and r["train/local_global"] > 0
    assert any("eval/zeroshot_top1" in r for r in rows)
    log_b1 = train(b, synthetic, *SETTINGS[preset], "--stop_after_steps", "3")
    assert "stopping after step 3" in log_b1 and "final zero-shot" not in log_b1
    log_b2 = train(b, synthetic, *SETTINGS[preset], "--resume", "auto")
    assert "resumed from step00000003 at step 3" in log_b2
    assert shared_memory_buffers() <= shm_before  # the ranks' shared memory went with them

    # The logged losses of steps 4-6 and the final parameters are the same.
    def losses(log, steps):
        return [line.split("| loss ")[1].split(" ")[0] for line in log.splitlines()
                if line.startswith(tuple(f"step {s}/6 " for s in steps))]
    assert losses(log_a, (4, 5, 6)) == losses(log_b2, (4, 5, 6))
    sa = consolidate(str(a / "checkpoints" / "step00000006"))
    sb = consolidate(str(b / "checkpoints" / "step00000006"))
    assert sa.keys() == sb.keys() and len(sa) > 50
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    # ... and differ from step 3, so the comparison means something.
    s3 = consolidate(str(b / "checkpoints" / "step00000003"))
    assert any(not torch.equal(s3[k], sb[k]) for k in sb)
    # The fp32 EMA teacher shards, restored on resume, end identical too.
    ta = consolidate_teacher(str(a / "checkpoints" / "step00000006"))
    tb = consolidate_teacher(str(b / "checkpoints" / "step00000006"))
    t3 = consolidate_teacher(str(b / "checkpoints" / "step00000003"))
    assert ta.keys() == tb.keys() and len(ta) > 20
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(t3[k], tb[k]) for k in tb)
    assert any(k.startswith("global_head.") for k in ta)  # SILC's head is part of the EMA
    if preset == "silc":
        # One EMA update per optimiser step under accumulation 2: teacher_6 = m * teacher_5 +
        # (1 - m) * student_6 (two updates would give m^2 * teacher_5 + ...).
        t5 = consolidate_teacher(str(a / "checkpoints" / "step00000005"))
        to_student = dict(PREFIXES.values())
        student = {k: sa[next(to_student[p] + k[len(p):] for p in to_student
                              if k.startswith(p))] for k in ta}
        for k in ta:
            torch.testing.assert_close(ta[k], 0.9 * t5[k] + 0.1 * student[k], rtol=1e-5,
                                       atol=1e-6, msg=k)
        return

    # tools/eval.py on the final checkpoint reproduces the evaluation the trainer ran.
    with open(a / "eval_step00000006.json") as f:
        during = json.load(f)
    proc = run_tool("eval.py", "--checkpoint", str(a / "checkpoints" / "step00000006"),
                    "--use-run-eval-set", "--json", str(tmp_path / "e.json"))
    with open(tmp_path / "e.json") as f:
        after = json.load(f)
    for k in ("zeroshot_top1", "zeroshot_top5", "i2t_R@5"):
        assert abs(during[k] - after[k]) < 1e-6, (k, during, after)
    assert "zeroshot_top1" in proc.stdout
    # Pictures at the evaluation: training samples with masks and crops, similarity maps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(a / "tensorboard"), size_guidance={"images": 4})
    events.Reload()
    assert {"train/samples", "eval/patch_text_similarity"} <= set(events.Tags()["images"])
    # The probes ran during training at world size 2 (eval.probes) and in tools/eval.py.
    for k in ("linear_probe_top1", "dense_probe_miou", "zeroshot_seg_miou"):
        assert 0 <= during[k] <= 1 and 0 <= after[k] <= 1 and k in proc.stdout

    # The ZeRO-3 checkpoint of 2 ranks, converted: timm loads the EMA teacher's encoder (strict)
    # through the printed create_model call and embeds like megaclip's; --verify agrees.
    exported = tmp_path / "exported"
    proc = run_tool("convert_checkpoint.py", str(a), "--out", str(exported), "--encoder",
                    "teacher", "--verify")
    assert "verify safetensors: largest absolute difference" in proc.stdout
    assert "verify timm (teacher): largest absolute difference" in proc.stdout
    assert "verify open_clip: largest absolute difference" in proc.stdout
    # open_clip, as a user loads it: the model config, the weights, the exported tokenizer.
    import importlib.util
    import open_clip
    from megaclip.checkpoint.inference import load_for_inference
    from megaclip.data.tokenizer import Tokenizer
    reference, cfg = load_for_inference(str(a / "checkpoints" / "step00000006"))
    open_clip.add_model_config(str(exported / "megaclip_tiny.json"))
    oc_model, _, _ = open_clip.create_model_and_transforms(
        "megaclip_tiny", pretrained=str(exported / "open_clip_model.safetensors"))
    spec = importlib.util.spec_from_file_location("megaclip_tokenizer",
                                                  exported / "megaclip_tokenizer.py")
    tok_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tok_module)
    captions = ["a small red circle.", "two large green triangles and a blue square."]
    tokens, eot = Tokenizer(cfg.data.tokenizer, cfg.model.text.context_length).encode(captions)
    assert torch.equal(tok_module.tokenize(captions), tokens)
    pixels = torch.randn(2, 3, cfg.model.vision.image_size, cfg.model.vision.image_size)
    with torch.no_grad():
        ours = reference(images=pixels, tokens=tokens, eot=eot)
        theirs = oc_model.eval()(pixels, tok_module.tokenize(captions))
    torch.testing.assert_close(theirs[0], ours["image_features"], rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs[1], ours["text_features"], rtol=0, atol=1e-5)
    import timm
    spec = json.loads((exported / "timm_vit.json").read_text())
    model = timm.create_model(spec["arch"], pretrained=True, pretrained_cfg_overlay=dict(
        file=str(exported / "timm_vit.safetensors")), **spec["kwargs"]).eval()
    from megaclip.checkpoint.inference import checkpoint_config
    from megaclip.models.vision import trunk_for
    model_cfg = checkpoint_config(str(a / "checkpoints" / "step00000006")).model
    v = model_cfg.vision
    ours = trunk_for(model_cfg)
    ours.load_state_dict({k[len("trunk."):]: t for k, t in ta.items() if k.startswith("trunk.")})
    images = torch.randn(3, 3, v.image_size, v.image_size)
    with torch.no_grad():
        torch.testing.assert_close(model(images), ours.eval()(images)[:, 0], rtol=0, atol=1e-5)
