"""Checkpoints cannot be lost by mistake: `--resume PATH` only reads PATH; resuming from an older
checkpoint of the same run moves the newer ones aside; leftovers of interrupted writes are
removed at start; SIGTERM during a step writes a checkpoint and exits; a resume or an export
with another tokenizer file is refused. One real ZeRO-3 rank (`python megaclip/train.py`), the
same code path as every rank of a larger run."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megaclip.checkpoint.folder import MARKER, complete_checkpoints
from tests.conftest import ROOT, run_tool


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


@pytest.mark.slow
def test_a_resume_or_an_export_with_another_tokenizer_file_is_refused(tmp_path, synthetic):
    """Each checkpoint records the sha256 of the tokenizer it was trained with: a resume or an
    export that reads other bytes (a tokenizer retrained over the same path) is an error naming
    both; an older checkpoint without the record still resumes, with a warning, and results
    newer than the checkpoint resumed from go aside with its newer checkpoints; an export over
    a used --out needs --force and replaces it whole."""
    tok = tmp_path / "tok"
    for ext in (".model", ".vocab"):
        shutil.copyfile(synthetic / f"spm{ext}", f"{tok}{ext}")
    sha = hashlib.sha256((tmp_path / "tok.model").read_bytes()).hexdigest()
    (tmp_path / "other.txt").write_text("".join(
        f"{w} number {i} beside the {v}\n" for i in range(40)
        for w, v in (("a quiet harbour", "lighthouse"), ("seven tall pines", "frozen lake"))))
    run_tool("train_tokenizer.py", "--text", str(tmp_path / "other.txt"), "--out",
             str(tmp_path / "other"), "--vocab-size", "128")
    other_sha = hashlib.sha256((tmp_path / "other.model").read_bytes()).hexdigest()
    a = tmp_path / "a"
    ckpts = a / "checkpoints"
    _train(synthetic, a, "train.steps=2", "train.ckpt_every=2", f"data.tokenizer={tok}.model")
    record = json.loads((ckpts / "step00000002" / "tokenizer.json").read_text())
    assert record == {"path": f"{tok}.model", "sha256": sha}

    # Resume with another tokenizer file: refused before anything is loaded, naming both.
    proc = subprocess.run(_command(synthetic, a, "train.steps=4",
                                   f"data.tokenizer={tmp_path / 'other.model'}", "--resume",
                                   "auto"),
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    for named in (f"{tok}.model", sha, str(tmp_path / "other.model"), other_sha):
        assert named in proc.stderr
    assert "Traceback" not in proc.stderr

    # A checkpoint written before they recorded it resumes, with a warning; a result newer
    # than it (left by a run that went on) is moved aside, named in the log.
    os.remove(ckpts / "step00000002" / "tokenizer.json")
    (a / "eval_step00000004.json").write_text(json.dumps({"step": 4, "zeroshot_top1": 0.9}))
    log = _train(synthetic, a, "train.steps=3", "train.ckpt_every=2",
                 f"data.tokenizer={tok}.model", "--resume", "auto")
    assert "step00000002 records no tokenizer" in log
    aside = [d for d in os.listdir(ckpts) if d.startswith("aside-")]
    assert len(aside) == 1 and f"moved {ckpts / aside[0] / 'eval_step00000004.json'} aside" in log
    assert not (a / "eval_step00000004.json").exists()
    assert (ckpts / "step00000003" / "tokenizer.json").is_file()

    # The tokenizer retrained over the run's path (--force): an export copying it is refused.
    run_tool("train_tokenizer.py", "--text", str(tmp_path / "other.txt"), "--out", str(tok),
             "--vocab-size", "128", "--force")
    exported = tmp_path / "exported"
    proc = run_tool("convert_checkpoint.py", str(a), "--out", str(exported), "--formats",
                    "open_clip", check=False)
    assert proc.returncode == 2 and sha in proc.stderr and f"{tok}.model" in proc.stderr
    assert not exported.exists()
    for ext in (".model", ".vocab"):  # the tokenizer it was trained with, back in place
        shutil.copyfile(synthetic / f"spm{ext}", f"{tok}{ext}")
    run_tool("convert_checkpoint.py", str(a), "--out", str(exported), "--formats", "open_clip")
    assert (exported / "spm.model").read_bytes() == (tmp_path / "tok.model").read_bytes()
    # An older checkpoint without the record exports with a warning.
    proc = run_tool("convert_checkpoint.py", str(ckpts / "step00000002"), "--out",
                    str(tmp_path / "old"), "--formats", "open_clip")
    assert "records no tokenizer" in proc.stderr

    # A used --out: refused, untouched; with --force replaced whole.
    (exported / "notes.txt").write_text("kept unless --force")
    before = _digest(exported)
    proc = run_tool("convert_checkpoint.py", str(a), "--out", str(exported), "--formats",
                    "safetensors", check=False)
    assert proc.returncode == 2 and f"--out {exported}: the folder is not empty" in proc.stderr
    assert _digest(exported) == before
    run_tool("convert_checkpoint.py", str(a), "--out", str(exported), "--formats", "safetensors",
             "--force")
    assert sorted(os.listdir(exported)) == ["config.yaml", "model.safetensors"]
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n or ".replaced-" in n]
