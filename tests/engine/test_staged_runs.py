"""Staged objectives end to end through megaclip/train.py (objective.<term>.start_at): the
steps before a start run and cost what the objective without those terms does, their modules
stay as built, the EMA teacher equals the student at the start (ZeRO-3, world size 2), and a
run resumed before the start, or from the checkpoint of the start step itself, ends bit for bit
like an uninterrupted one."""
import json
import os
import subprocess

import pytest
import torch

from megaclip.checkpoint.inference import checkpoint_config
from megaclip.checkpoint.io import consolidate
from megaclip.checkpoint.safe_load import weights_only_loads
from megaclip.config import ObjectiveConfig
from megaclip.models import build_model
from megaclip.objectives.flops import train_flops_per_sample
from megaclip.objectives.stages import Stages
from megaclip.teacher.ema import PREFIXES
from megaclip.teacher.state import consolidate_teacher
from tests.conftest import ROOT, launch_prefix, synthetic_overrides


def train(out, synthetic, ranks, *extra):
    cmd = [*launch_prefix(ranks), "megaclip/train.py", "--deepspeed_config",
           "ds_configs/zero3_cpu.json", "--config", "clip_tiny_synthetic",
           *synthetic_overrides(synthetic, out), "eval.shards=", "train.tensorboard=false",
           "train.steps=6", "train.ckpt_every=3", "train.log_every=1", "data.workers=2",
           "data.shuffle_buffer=30", "optim.warmup_steps=2", "objective.mask_distill.prototypes=64",
           "objective.local_global.prototypes=64", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def ckpt(run, step):
    return str(run / "checkpoints" / f"step{step:08d}")


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_teacher_is_the_student_at_the_start_and_earlier_steps_cost_siglip_alone(
        tmp_path, synthetic):
    """siglip2 with its distillation terms from step 3 of 6, world size 2, ZeRO-3, teacher
    momentum fixed at 1 (the teacher stays what it was initialised to)."""
    log = train(tmp_path, synthetic, 2, "objective.preset=siglip2",
                "objective.contrastive=siglip", "objective.mask_distill.start_at=0.5",
                "objective.local_global.start_at=0.5", "objective.teacher.momentum=1.0",
                "objective.teacher.momentum_end=1.0", "train.micro_batch_size=4")
    assert ("objective stages: siglip from step 0; local_global, mask_distill from step 3 (50% "
            "of train.steps); the EMA teacher is initialised from the student at step 3") in log
    assert ("stage: local_global, mask_distill start at step 3 (logged from step 4 on); the EMA "
            "teacher is initialised from the student") in log
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    extra = ("train/distill", "train/local_global", "train/teacher_entropy",
             "train/teacher_update_rms")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(not any(k in r for k in extra) for r in rows[:3])  # nothing of theirs ran
    assert all(all(k in r for k in extra) for r in rows[3:])
    # The FLOPs behind the logged TFLOP/s: the objective without the late terms, then all.
    cfg = checkpoint_config(ckpt(tmp_path, 6))
    stages = Stages(cfg.objective, cfg.train.steps)
    before = train_flops_per_sample(cfg.model, stages.at(0))
    after = train_flops_per_sample(cfg.model, cfg.objective)
    assert before == train_flops_per_sample(cfg.model, ObjectiveConfig(contrastive="siglip"))
    for r in rows:
        logged = r["train/tflops_per_device"] * 1e12 / (r["train/samples_per_s"] / 2)
        assert logged == pytest.approx(before if r["step"] <= 3 else after, rel=1e-9)
    assert after > 3 * before
    # Before the start: no teacher saved, the late modules as built, the others trained.
    assert not os.path.exists(os.path.join(ckpt(tmp_path, 3), "teacher"))
    built = build_model(cfg.model, cfg.objective, seed=cfg.train.seed).state_dict()
    at_start, end = consolidate(ckpt(tmp_path, 3)), consolidate(ckpt(tmp_path, 6))
    late = tuple(p for ps in stages.later_params().values() for p in ps)
    assert sum(k.startswith(late) for k in at_start) > 10
    for k, v in at_start.items():
        assert torch.equal(v, built[k]) == k.startswith(late), k
    # The teacher, initialised at step 3 and never moved since: the student at step 3, exactly.
    teacher = consolidate_teacher(ckpt(tmp_path, 6))
    to_student = dict(PREFIXES.values())
    assert any(k.startswith("global_head.") for k in teacher) and len(teacher) > 20
    diff = max((t - at_start[next(to_student[p] + k[len(p):] for p in to_student
                                  if k.startswith(p))]).abs().max().item()
               for k, t in teacher.items())
    assert diff == 0.0
    assert any(not torch.equal(end[k], at_start[k]) for k in end)
    # Their Adam state began afresh at the start: 3 steps since, against the others' 6.
    with weights_only_loads():
        optim = torch.load(os.path.join(ckpt(tmp_path, 6), "zero_pp_rank_0_mp_rank_00_optim_states"
                                        ".pt"), map_location="cpu", weights_only=True)
    inner = optim["optimizer_state_dict"]["optimizer_state_dict"]
    assert [g["name"] for g in inner["param_groups"]] == ["decay", "no_decay", "decay@3",
                                                          "no_decay@3"]
    assert [float(inner["state"][i]["step"]) for i in range(4)] == [6, 6, 3, 3]


@pytest.mark.slow
def test_resume_before_and_at_the_start_equals_an_uninterrupted_run(tmp_path, synthetic):
    """maskclip with distillation and MLM from step 3 of 6 (one process, 2 data workers),
    resumed from its checkpoint of step 2, or of step 3 (written before the start, without a
    teacher), ends with the parameters and EMA teacher of the run that never stopped."""
    staged = ("objective.preset=maskclip", "objective.mask_distill.start_at=3",
              "objective.text_mlm.start_at=0.5", "train.micro_batch_size=8")
    a = tmp_path / "a"
    train(a, synthetic, 1, *staged, "train.ckpt_every=1", "train.keep_checkpoints=0")
    final, teacher = consolidate(ckpt(a, 6)), consolidate_teacher(ckpt(a, 6))
    for step in (2, 3):
        other = tmp_path / f"from{step}"
        log = train(other, synthetic, 1, *staged, "--resume", ckpt(a, step))
        assert f"resumed from step{step:08d} at step {step}" in log
        assert "stage: mask_distill, text_mlm start at step 3" in log
        again, again_teacher = consolidate(ckpt(other, 6)), consolidate_teacher(ckpt(other, 6))
        assert final.keys() == again.keys() and teacher.keys() == again_teacher.keys()
        assert all(torch.equal(final[k], again[k]) for k in final), step
        assert all(torch.equal(teacher[k], again_teacher[k]) for k in teacher), step
