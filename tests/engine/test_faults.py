"""Non-finite steps, end to end through `deepspeed megaclip/train.py` at world size 2 with the
maskclip objective (EMA teacher and distillation centre): a NaN injected into one rank's batch
(the MEGACLIP_INJECT_NAN test hook) is skipped on every rank and leaves parameters, optimiser
state, teacher and centre bit-identical; K in a row end the run, keeping the last good
checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch

from megaclip.checkpoint.io import consolidate
from megaclip.teacher.state import consolidate_teacher
from megaclip.checkpoint.folder import complete_checkpoints
from tests.conftest import ROOT, free_port


def _run(out, synthetic, inject, *extra):
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "megaclip/train.py",
           "--deepspeed_config", "ds_configs/zero3_cpu.json", "--config", "clip_tiny_synthetic",
           f"data.train_shards={synthetic}/train/shard-{{000000..000003}}.tar",
           f"data.tokenizer={synthetic}/spm.model", 'eval.shards=""',
           f"train.output_dir={out}", "train.micro_batch_size=8", "train.log_every=1",
           "train.ckpt_every=1", "data.shuffle_buffer=16", "data.workers=1",
           "optim.warmup_steps=1", "objective.preset=maskclip",
           "objective.mask_distill.prototypes=64", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "MEGACLIP_INJECT_NAN": inject})


def _same(a, b, where=""):
    """Recursively equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")


def _optimizer_states(tag_dir):
    files = sorted(f for f in os.listdir(tag_dir) if f.endswith("optim_states.pt"))
    assert len(files) == 2
    return [torch.load(os.path.join(tag_dir, f), map_location="cpu", weights_only=False)
            ["optimizer_state_dict"] for f in files]


def _centre(tag_dir, rank):
    client = torch.load(os.path.join(tag_dir, "client", f"rank{rank:05d}.pt"), weights_only=True)
    return client["objective"]["distill.centering.center"]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_nan_on_one_rank_skips_the_step_on_every_rank_and_changes_nothing(tmp_path, synthetic):
    out = tmp_path / "run"
    proc = _run(out, synthetic, "3:1", "train.steps=5", "train.keep_checkpoints=10",
                "objective.mask_distill.freeze_prototypes_steps=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 3 skipped on every rank: non-finite " in proc.stdout
    assert "on 1 rank(s)" in proc.stdout.split("step 3 skipped")[1].splitlines()[0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r] == [
        0, 0, 1, 1, 1]
    assert all(r["train/loss"] == r["train/loss"] for r in rows if "train/loss" in r)  # no NaN

    ckpts = out / "checkpoints"
    s2, s3, s4 = (str(ckpts / f"step{n:08d}") for n in (2, 3, 4))
    _same(consolidate(s2), consolidate(s3), "parameters")
    _same(_optimizer_states(s2), _optimizer_states(s3), "optimizer")
    _same(consolidate_teacher(s2), consolidate_teacher(s3), "teacher")
    for rank in (0, 1):
        _same(_centre(s2, rank), _centre(s3, rank), "centre")
        assert torch.isfinite(_centre(s3, rank)).all()
    # Training went on from there.
    p3, p4 = consolidate(s3), consolidate(s4)
    assert any(not torch.equal(p3[k], p4[k]) for k in p3)
    assert all(torch.isfinite(v).all() for v in p4.values())
    assert not torch.equal(_centre(s3, 0), _centre(s4, 0))
    # The prototype layer, frozen for steps 1-2, kept its directions (decoupled weight decay
    # only scales its rows, which the head normalises); from step 4 on it learns.
    def rows(tag):
        w = consolidate(str(ckpts / f"step{tag:08d}"))["distill_head.prototypes.weight"]
        return torch.nn.functional.normalize(w, dim=-1)
    torch.testing.assert_close(rows(1), rows(2), rtol=0, atol=1e-6)
    assert (rows(4) - rows(5)).abs().max() > 1e-4


@pytest.mark.distributed
@pytest.mark.slow
def test_k_non_finite_steps_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(
        tmp_path, synthetic):
    out = tmp_path / "run"
    proc = _run(out, synthetic, "3:0,4:0,5:0", "train.steps=8", "train.keep_checkpoints=1",
                "train.max_skipped_steps_in_a_row=3")
    assert proc.returncode != 0
    assert ("error: 3 steps in a row were not finite (up to step 5; "
            "train.max_skipped_steps_in_a_row); the last good checkpoint is kept: "
            "step00000002") in proc.stderr
    kept = [t for _, t in complete_checkpoints(str(out / "checkpoints"))]
    assert "step00000002" in kept and "step00000005" not in kept
