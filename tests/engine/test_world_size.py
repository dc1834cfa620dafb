"""A checkpoint saved on N ranks continues on M (fp32 ZeRO-3, the same global batch): after
2 -> 1 with the maskclip objective, the fp32 parameters, the Adam moments of every parameter and
the EMA teacher are bit-identical to what was saved and the data stream restarts with fresh
seeds; after 2 -> 1 -> 2 the losses are those of the run that kept its 2 ranks."""
import json
import os
import subprocess
import sys

import pytest
import torch

from megaclip.checkpoint.io import consolidate
from megaclip.teacher.state import consolidate_teacher
from megaclip.data.shards import iter_shard
from megaclip.make.writer import write_shards
from tests.conftest import ROOT, launch_prefix


def _command(ranks, synthetic, out, *extra):
    return [*launch_prefix(ranks), "megaclip/train.py", "--deepspeed_config", "ds_configs/zero3_cpu.json",
            "--config", "clip_tiny_synthetic",
            f"data.train_shards={synthetic}/train/shard-{{000000..000003}}.tar",
            f"data.tokenizer={synthetic}/spm.model", 'eval.shards=""', f"train.output_dir={out}",
            f"train.micro_batch_size={16 // ranks}", "train.log_every=1", "data.workers=1",
            "data.shuffle_buffer=16", "optim.warmup_steps=1", "objective.preset=maskclip",
            "objective.mask_distill.prototypes=64", *extra]


def _train(ranks, synthetic, out, *extra):
    proc = subprocess.run(_command(ranks, synthetic, out, *extra), capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _adam_moments(tag_dir, scratch):
    """Every parameter's fp32 weight and Adam moments, through DeepSpeed's universal format."""
    out = str(scratch / os.path.basename(os.path.dirname(os.path.dirname(tag_dir))))
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                    "--input_folder", tag_dir, "--output_folder", out, "--num_extract_workers",
                    "1", "--num_merge_workers", "1"], check=True, capture_output=True)
    states = {}
    for name in os.listdir(os.path.join(out, "zero")):
        folder = os.path.join(out, "zero", name)
        if os.path.isdir(folder):
            for f in ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"):
                value = torch.load(os.path.join(folder, f), weights_only=False)
                states[f"{name}/{f}"] = value["param"] if isinstance(value, dict) else value
    return states


def _assert_same(a, b):
    assert a.keys() == b.keys() and len(a) > 20
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_at_another_world_size_keeps_every_state(tmp_path, synthetic):
    two, one = tmp_path / "two", tmp_path / "one"
    _train(2, synthetic, two, "train.steps=2", "train.ckpt_every=2")
    saved = str(two / "checkpoints" / "step00000002")

    # 2 -> 1: loaded, then saved at once (train.steps is the step it resumes at).
    log = _train(1, synthetic, one, "train.steps=2", "train.ckpt_every=3", "--resume", saved)
    assert "resumed from step00000002 at step 2" in log
    assert "it restarts with fresh seeds instead of replaying" in log
    on_one = str(one / "checkpoints" / "step00000002")
    _assert_same(consolidate(saved), consolidate(on_one))
    _assert_same(consolidate_teacher(saved), consolidate_teacher(on_one))
    moments = _adam_moments(saved, tmp_path / "u2")
    _assert_same(moments, _adam_moments(on_one, tmp_path / "u1"))
    # The conversion happened in the resuming run's folder and was removed; the source untouched.
    def steps(folder):
        return sorted(n for n in os.listdir(folder) if n.startswith("step"))
    assert steps(two / "checkpoints") == ["step00000002"]
    assert steps(one / "checkpoints") == ["step00000002"]



def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.distributed
@pytest.mark.slow
def test_after_a_change_of_size_the_next_losses_are_the_unchanged_runs(tmp_path, synthetic):
    """2 -> 1 and back 1 -> 2 give the losses of the 2-rank run that never stopped. The data
    is made so that every global batch holds the same pairs at any number of ranks (four
    copies of one 8-sample shard, no shuffle, whole-image crops), since the stream itself
    restarts with fresh seeds when the number of ranks changes."""
    samples = list(iter_shard(str(synthetic / "train" / "shard-000000.tar")))[:8]
    shards = [write_shards(samples, str(tmp_path / f"copy{i}"), maxcount=8)[0] for i in range(4)]
    data = ["data.train_shards=" + "::".join(shards), "data.resampled=false",
            "data.shuffle_buffer=0", "data.crop_scale=[1.0,1.0]", "data.crop_ratio=[1.0,1.0]",
            "objective.preset=clip", "train.ckpt_every=2", "train.keep_checkpoints=10"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _train(2, synthetic, a, *data, "train.steps=6")
    _train(1, synthetic, b, *data, "train.steps=6", "--stop_after_steps", "2", "--resume",
           str(a / "checkpoints" / "step00000002"))  # the same schedule, stopped at step 4
    _train(2, synthetic, c, *data, "train.steps=6", "--resume",
           str(b / "checkpoints" / "step00000004"))
    reference, one, back = _losses(a), _losses(b), _losses(c)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6] and sorted(one) == [3, 4]
    assert sorted(back) == [5, 6] and len(set(reference.values())) == 6  # it does learn
    for step, loss in {**one, **back}.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step


@pytest.mark.distributed
@pytest.mark.slow
def test_a_conversion_slower_than_the_collective_timeout_still_resumes(tmp_path, synthetic):
    """1 -> 2 ranks with a process-group timeout of 1 minute (the rendezvous of two ranks
    starting on a busy 2-core machine needs some of it) while rank 0's conversion to the
    universal format takes over 90 s: rank 1 waits for it by polling a file, in no collective,
    so the resume goes through instead of timing out."""
    one, two = tmp_path / "one", tmp_path / "two"
    quick = ("objective.preset=clip", "train.ckpt_every=2")
    _train(1, synthetic, one, "train.steps=2", *quick)
    slow = {**os.environ, "MEGACLIP_TEST_CONVERSION_DELAY_S": "90"}
    proc = subprocess.run(_command(2, synthetic, two, "train.steps=3",
                                   "train.dist_timeout_min=1", *quick,
                                   "--resume", str(one / "checkpoints" / "step00000002")),
                          capture_output=True, text=True, cwd=ROOT, timeout=900, env=slow)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "resumed from step00000002 at step 2" in log
    names = os.listdir(two / "checkpoints")
    # The conversion and rank 0's result file were removed once every rank had loaded.
    assert "step00000003" in names and not [n for n in names if ".universal" in n], names
