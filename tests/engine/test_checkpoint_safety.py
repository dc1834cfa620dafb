"""Checkpoints cannot be lost by mistake: `--resume PATH` only reads PATH; resuming from an older
checkpoint of the same run moves the newer ones aside; leftovers of interrupted writes are
removed at start; SIGTERM during a step writes a checkpoint and exits. One real ZeRO-3 rank
(`python megaclip/train.py`), the same code path as every rank of a larger run."""
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from megaclip.checkpoint.folder import MARKER, complete_checkpoints
from tests.conftest import ROOT


def _command(synthetic, out, *extra):
    return [sys.executable, "-u", "megaclip/train.py", "--deepspeed_config",
            "ds_configs/zero3_cpu.json", "--config", "clip_tiny_synthetic",
            f"data.train_shards={synthetic}/train/shard-{{000000..000003}}.tar",
            f"data.tokenizer={synthetic}/spm.model", 'eval.shards=""',
            f"train.output_dir={out}", "train.micro_batch_size=8", "train.log_every=1",
            "data.shuffle_buffer=16", "data.workers=1", "optim.warmup_steps=2",
            "train.keep_checkpoints=10", *extra]


def _train(synthetic, out, *extra):
    proc = subprocess.run(_command(synthetic, out, *extra), capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _digest(folder):
    """Every file under ``folder`` with a hash of its bytes."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.slow
def test_resume_reads_only_the_path_and_never_overwrites_or_deletes(tmp_path, synthetic):
    a = tmp_path / "a"
    _train(synthetic, a, "train.steps=6", "train.ckpt_every=2")
    ckpts = a / "checkpoints"
    assert [t for _, t in complete_checkpoints(str(ckpts))] == [
        "step00000002", "step00000004", "step00000006"]
    # What an interrupted write leaves: a temporary directory; and a directory without a marker.
    (ckpts / "step00000008.tmp").mkdir()
    (ckpts / "step00000008.tmp" / "part").write_text("x")
    (ckpts / "step00000010").mkdir()
    before = _digest(a)

    # Another run resuming from a's step 2 reads it and writes only under its own folder.
    b = tmp_path / "b"
    log = _train(synthetic, b, "train.steps=4", "train.ckpt_every=2", "--resume",
                 str(ckpts / "step00000002"))
    assert f"resumed from step00000002 at step 2 (read from {ckpts})" in log
    assert _digest(a) == before
    assert [t for _, t in complete_checkpoints(str(b / "checkpoints"))] == ["step00000004"]

    # The same run resuming from its older step 2: the leftovers go, steps 4 and 6 are moved
    # aside (named in the log), step 2 itself is not touched, and the run saves a new step 4.
    log = _train(synthetic, a, "train.steps=4", "train.ckpt_every=2", "--resume",
                 str(ckpts / "step00000002"))
    assert "removed step00000008.tmp, left by an interrupted checkpoint write" in log
    # A marker-less directory is not one megaclip wrote: named, left alone, never resumed.
    assert "ignored step00000010: no COMPLETE marker" in log
    assert (ckpts / "step00000010").is_dir()
    aside = [d for d in os.listdir(ckpts) if d.startswith("aside-")]
    assert len(aside) == 1
    for tag in ("step00000004", "step00000006"):
        assert f"moved {ckpts / aside[0] / tag} aside" in log
        moved = {k.split("/", 3)[3]: v for k, v in _digest(a).items()
                 if k.startswith(f"checkpoints/{aside[0]}/{tag}/")}
        assert moved == {k.split("/", 2)[2]: v for k, v in before.items()
                         if k.startswith(f"checkpoints/{tag}/")}
    after = _digest(a)
    assert {k: v for k, v in after.items() if k.startswith("checkpoints/step00000002/")} == {
        k: v for k, v in before.items() if k.startswith("checkpoints/step00000002/")}
    assert [t for _, t in complete_checkpoints(str(ckpts))] == ["step00000002", "step00000004"]
    assert not any(n.endswith(".tmp") for n in os.listdir(ckpts))


@pytest.mark.slow
def test_sigterm_during_a_step_writes_a_checkpoint_and_exits(tmp_path, synthetic):
    """As Slurm does, the signal goes to every process of the job: the data-loader workers
    survive it, the trainer checkpoints, shuts them down and exits."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(synthetic, out, "train.steps=500", "train.ckpt_every=0",
                                     "data.workers=2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/500 "):
            os.killpg(proc.pid, signal.SIGTERM)
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, "".join(lines)[-2000:] + stderr[-2000:]
    time.sleep(1)
    with pytest.raises(ProcessLookupError):  # no worker outlived the trainer
        os.killpg(proc.pid, 0)
    stop = next(line for line in lines if line.startswith("pre-empted by SIGTERM after step "))
    step = int(stop.split("after step ")[1].split(":")[0])
    assert 3 <= step < 500 and "checkpoint saved" in stop
    tag_dir = out / "checkpoints" / f"step{step:08d}"
    assert (tag_dir / MARKER).is_file()
    assert not any(line.startswith(f"step {step + 1}/") for line in lines)
