"""kill -9 at five moments of a run, one of them inside a checkpoint write: every restart with
`--resume auto` goes on from the newest complete checkpoint, and every step it then logs has the
loss of an uninterrupted run. One real ZeRO-3 rank (`python megaclip/train.py`)."""
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from megaclip.checkpoint.folder import complete_checkpoints
from tests.conftest import ROOT, shared_memory_buffers

STEPS = 12


def _command(synthetic, out):
    return [sys.executable, "-u", "megaclip/train.py", "--deepspeed_config",
            "ds_configs/zero3_cpu.json", "--config", "clip_tiny_synthetic",
            f"data.train_shards={synthetic}/train/shard-{{000000..000003}}.tar",
            f"data.tokenizer={synthetic}/spm.model", 'eval.shards=""',
            f"train.output_dir={out}", "train.micro_batch_size=8", "train.log_every=1",
            "data.shuffle_buffer=16", "data.workers=1", "optim.warmup_steps=2",
            f"train.steps={STEPS}", "train.ckpt_every=2", "train.keep_checkpoints=2",
            "--resume", "auto"]


def _losses(text):
    return {int(m.group(1)): m.group(2)
            for m in re.finditer(rf"^step (\d+)/{STEPS} .*?\| loss (\S+) ", text, re.M)}


def _run_until(synthetic, out, moment):
    """Start a run; SIGKILL its process group when ``moment`` comes: ("step", k) once step k is
    logged, ("write", None) while a checkpoint directory is still ``*.tmp``. Returns stdout."""
    proc = subprocess.Popen(_command(synthetic, out), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))
    reader.start()
    ckpts, deadline = out / "checkpoints", time.time() + 300
    kind, k = moment
    while proc.poll() is None and time.time() < deadline:
        hit = (kind == "step" and any(line.startswith(f"step {k}/{STEPS} ") for line in lines)
               ) or (kind == "write" and ckpts.is_dir() and
                     any(n.endswith(".tmp") for n in os.listdir(ckpts)))
        if hit:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    reader.join(timeout=60)
    return "".join(lines)


@pytest.mark.slow
def test_kill_9_anywhere_resumes_from_the_newest_complete_checkpoint(tmp_path, synthetic):
    shm_before = shared_memory_buffers()
    reference = subprocess.run(_command(synthetic, tmp_path / "reference"), capture_output=True,
                               text=True, cwd=ROOT, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = _losses(reference.stdout)
    assert sorted(expected) == list(range(1, STEPS + 1))

    out = tmp_path / "run"
    rng = random.Random(7)
    moments = [("step", k) for k in sorted(rng.sample(range(1, STEPS), 4))]
    moments.insert(rng.randrange(1, 4), ("write", None))
    newest, seen_steps, left = None, set(), None
    for moment in moments + [("end", None)]:
        text = _run_until(synthetic, out, moment)
        if left:  # what the write killed half-way left behind was cleared first, or completed
            # when only its rename was missing (the kill fell after its marker)
            completed = f"completed {left[:-4]}: its write had finished" in text
            assert completed or f"removed {left}, left by an interrupted checkpoint write" in text
            if completed:
                newest = left[:-4]
        left = None
        if moment[0] == "write":
            left = next(n for n in os.listdir(out / "checkpoints") if n.endswith(".tmp"))
        if newest is not None:
            assert f"resumed from {newest} at step {int(newest[4:])}" in text, (moment, text[-2000:])
        else:
            assert "resumed from" not in text
        for step, loss in _losses(text).items():
            assert loss == expected[step], (moment, step, loss, expected[step])
            seen_steps.add(step)
        found = complete_checkpoints(str(out / "checkpoints"))
        newest = found[-1][1] if found else None
    assert f"step {STEPS}/{STEPS} " in text and newest == f"step{STEPS:08d}"
    assert seen_steps == set(range(1, STEPS + 1))
    # Killed or not, no run left its shared memory behind (66 MB of RAM each, until reboot).
    assert shared_memory_buffers() <= shm_before
