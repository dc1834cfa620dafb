"""The EMA teacher at world size 2 through the real DeepSpeed launcher (tests/engine/
teacher_steps.py), at ZeRO-3 (sharded), at stages 0, 1 and 2 in fp32 and at stage 2 in bf16
(whole parameters; at stages 1-2 each rank's EMA covers its fragments of the fp32 masters)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megaclip.teacher.state import shard_of, unshard
from megaclip.teacher.ema import momentum_at
from tests.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "engine", "teacher_steps.py")
STAGES = (3, 0, 1, 2)
BF16 = "2bf16"  # zero2_bf16.json: bf16 parameters, fp32 masters cut over the ranks
STAGED = "2staged"  # ZeRO-2, distillation and MLM from the last step (start_at)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port",
                           str(free_port()), SCRIPT, str(out), "3",
                           ",".join(map(str, (*STAGES, BF16, STAGED)))],
                          capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    found = {}
    for stage in (*STAGES, BF16):
        with open(out / f"stage{stage}.json") as f:
            found[stage] = json.load(f)
        found[stage]["tensors"] = torch.load(out / f"stage{stage}.pt", weights_only=False)
    with open(out / f"stage{STAGED}.json") as f:
        found[STAGED] = json.load(f)
    return found


@pytest.mark.distributed
def test_sharded_ema_equals_a_whole_parameter_fp32_ema(reports):
    r = reports[3]
    assert r["world_size"] == 2
    assert r["max_abs_teacher_move"] > 1e-4  # the teacher did move over the steps ...
    assert r["max_abs_diff_vs_reference"] <= 1e-7  # ... exactly as the one-process EMA did
    teacher, reference = r["tensors"]["teacher"], r["tensors"]["reference"]
    assert teacher.keys() == reference.keys() and len(teacher) > 20
    for k in teacher:
        assert teacher[k].shape == reference[k].shape and teacher[k].dtype == torch.float32
        torch.testing.assert_close(teacher[k], reference[k], rtol=0, atol=1e-7, msg=k)


@pytest.mark.distributed
def test_ema_update_makes_no_collective_call(reports):
    for stage in STAGES:
        assert reports[stage]["update_collectives"] == 0, stage
        assert reports[stage]["control_collectives"] >= 2  # the counter does see collectives


@pytest.mark.distributed
def test_zero3_teacher_gathers_its_whole_copy_once_per_update(reports):
    r = reports[3]
    assert "whole" in r["teacher_forward"] and "once per optimiser step" in r["teacher_forward"]
    assert r["fresh_forward_collectives"] == 0  # two forwards on a fresh copy: no traffic
    assert r["refresh_collectives"] == 1  # update + prefetch + two forwards: one all-gather
    assert r["per_block_forward_collectives"] > 10  # the per-block path gathers every forward
    assert r["restored_same_output"]  # and gives the whole copy's output bit for bit
    for stage in (0, 1, 2):  # whole parameters
        assert reports[stage]["fresh_forward_collectives"] == 0, stage
    # fp32 at stage 0: the EMA is whole on every rank, nothing to gather; at stages 1-2 each
    # rank holds the EMA of its fragments of the optimiser's fp32 masters, and the whole
    # working copy comes back in one all-gather per update.
    assert reports[0]["refresh_collectives"] == 0
    for stage in (1, 2):
        assert reports[stage]["refresh_collectives"] == 1, stage
        assert "fragments by one all-gather" in reports[stage]["teacher_forward"]


@pytest.mark.distributed
def test_teacher_memory_per_rank_is_one_over_n(reports):
    r = reports[3]
    assert 0.49 < r["held_bytes"] / r["full_bytes"] < 0.51
    assert reports[0]["held_bytes"] == reports[0]["full_bytes"]  # whole parameters at stage 0
    for stage in (1, 2):  # each rank's fragments of the optimiser's flat fp32 buffers
        assert reports[stage]["held_bytes"] < reports[stage]["full_bytes"], stage


@pytest.mark.distributed
def test_teacher_shards_restore_bit_for_bit(reports):
    for stage in STAGES:
        assert reports[stage]["restored_exact_all_ranks"], stage


@pytest.mark.distributed
def test_same_teacher_at_zero_stages_0_1_2_and_3(reports):
    sharded = reports[3]["tensors"]["teacher"]
    for stage in (0, 1, 2):
        assert reports[stage]["max_abs_diff_vs_reference"] <= 1e-7
        for k, v in reports[stage]["tensors"]["teacher"].items():
            # The stages sum gradients in other orders; Adam turns a last-bit difference of a
            # near-zero gradient into up to ~1e-6 of parameter (seen on a qkv bias).
            torch.testing.assert_close(v, sharded[k], rtol=1e-5, atol=5e-6, msg=f"{stage} {k}")
        for a, b in zip(reports[stage]["losses"], reports[3]["losses"]):
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (stage, a, b)


@pytest.mark.distributed
def test_bf16_stage2_teacher_blends_this_ranks_fp32_fragments(reports):
    """bf16 at ZeRO-2: the EMA reads the optimiser's fp32 masters (not the bf16 parameters),
    this rank's fragments only, with no collective; the bf16 working copy comes back in one
    all-gather per update; the checkpoint holds the whole fp32 EMA, restored exactly."""
    r = reports[BF16]
    assert r["max_abs_teacher_move"] > 1e-4
    assert r["max_abs_diff_vs_reference"] <= 1e-7  # the whole-parameter fp32 EMA of the masters
    assert r["update_collectives"] == 0 and r["control_collectives"] >= 2
    assert r["refresh_collectives"] == 1 and r["fresh_forward_collectives"] == 0
    assert "bfloat16" in r["teacher_forward"] and "fragments" in r["teacher_forward"]
    assert r["held_bytes"] < r["full_bytes"]
    assert r["restored_exact_all_ranks"]
    assert all(t.dtype == torch.float32 for t in r["tensors"]["teacher"].values())


@pytest.mark.distributed
def test_zero2_teacher_of_late_terms_equals_the_student_at_their_start(reports):
    """ZeRO-2, world size 2: terms that start late leave their modules exactly as built though
    the optimiser steps over them (learning rate 0, no gradient: no weight decay either), run
    nothing before their start, and the teacher initialised at their start from this rank's
    fp32 fragments equals the student exactly."""
    r = reports[STAGED]
    assert r["late_groups"] == ["decay@2", "no_decay@2"]
    assert r["adam_steps"] == [3, 3, 1, 1]  # their Adam state began afresh at the start
    assert r["late_unchanged_before_start"] and r["others_moved"]
    assert r["teacher_vs_student_at_start"] == 0.0 and r["teacher_tensors"] > 20
    assert r["terms"][0] == ["clip", "logit_scale", "loss"]  # no distill, mlm, teacher stats
    assert {"distill", "mlm", "teacher_entropy"} <= set(r["terms"][2])


@pytest.mark.parametrize("numel,ws", [(10, 3), (7, 2), (64, 4), (1, 8)])
def test_shards_cut_and_join_like_zero3(numel, ws):
    full = torch.arange(numel, dtype=torch.float32).reshape(-1, 1) if numel > 1 else torch.ones(1)
    shards = [shard_of(full, r, ws) for r in range(ws)]
    assert all(s.numel() == math.ceil(numel / ws) for s in shards)
    assert torch.equal(unshard(shards, numel, tuple(full.shape)), full)
    # Re-sharding for another world size goes through the whole tensor.
    again = [shard_of(unshard(shards, numel, tuple(full.shape)), r, ws + 1) for r in range(ws + 1)]
    assert torch.equal(unshard(again, numel, tuple(full.shape)), full)


def test_momentum_schedule_cosine_to_one_or_fixed():
    assert momentum_at(0, 1000, 0.996, 1.0) == pytest.approx(0.996)
    assert momentum_at(500, 1000, 0.996, 1.0) == pytest.approx(0.998)
    assert momentum_at(1000, 1000, 0.996, 1.0) == pytest.approx(1.0)
    assert momentum_at(700, 1000, 0.996, 0.996) == 0.996


def _maskclip_tiny():
    from megaclip.config import load_config
    from megaclip.models import build_model, resolve_model_config
    cfg = load_config(None, ["objective.preset=maskclip", "model.preset=tiny"])
    mcfg = resolve_model_config(cfg.model, vocab_size=64)
    return mcfg, cfg.objective, build_model(mcfg, cfg.objective, seed=0)


def test_a_bf16_teacher_without_the_students_fp32_masters_is_refused():
    """bf16 at ZeRO stage 0: DeepSpeed's fp32 masters are not linked to the parameters, and
    blending the bf16 values would quietly lose the EMA's precision."""
    from megaclip.errors import UserError
    from megaclip.teacher.build import build_teacher_modules
    from megaclip.teacher.ema import EmaTeacher
    mcfg, obj, student = _maskclip_tiny()
    student = student.to(torch.bfloat16)
    trunk, heads = build_teacher_modules(mcfg, obj, None, torch.bfloat16)
    with pytest.raises(UserError, match="needs the student's fp32 masters: use ZeRO stage 1, 2"):
        EmaTeacher(student, trunk, heads, torch.bfloat16)


class _Fragment:
    """DeepSpeed's ``_hp_mapping`` of a parameter whose fp32 master fragment is ``hp``."""

    def __init__(self, start, hp):
        from deepspeed.utils.tensor_fragment import fragment_address
        self.lp_fragment_address = fragment_address(start=start, numel=hp.numel())
        self.hp = hp

    def get_hp_fragment(self):
        return self.hp


def test_fragment_ema_blends_the_masters_and_a_rank_without_fragments_steps_too():
    """One process standing for a rank of ZeRO 1-2: the EMA of each fragment moves towards its
    fp32 master, the working parameters come back whole, and a rank that holds no fragment of
    the teacher (the middle ranks of a large world hold text weights only) updates nothing and
    measures 0 instead of failing."""
    from megaclip.teacher.build import build_teacher_modules
    from megaclip.teacher.ema import EmaTeacher
    mcfg, obj, student = _maskclip_tiny()
    masters = {}
    for name, p in student.named_parameters():
        masters[name] = p.detach().reshape(-1).clone() + 1.0  # "the fp32 master"
        p._hp_mapping = _Fragment(0, masters[name])
    trunk, heads = build_teacher_modules(mcfg, obj, None, torch.float32)
    teacher = EmaTeacher(student, trunk, heads, torch.float32)
    teacher.init_from_student()
    assert teacher.fragments is not None
    name, p, s = teacher.pairs[0]
    start = teacher.ema[name].clone()
    masters_s = s._hp_mapping.hp
    masters_s.add_(1.0)
    rms = teacher.update(0.9, measure=True)
    torch.testing.assert_close(teacher.ema[name], 0.9 * start + 0.1 * masters_s)
    assert float(rms) > 0
    teacher.prefetch()
    teacher.tokens(torch.randn(1, 3, mcfg.vision.image_size, mcfg.vision.image_size))
    torch.testing.assert_close(p.reshape(-1), teacher.ema[name])  # the working copy, whole
    teacher.fragments.own, teacher.ema = [], {}  # a rank holding none
    assert float(teacher.update(0.9, measure=True)) == 0.0
