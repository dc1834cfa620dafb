"""End to end through `deepspeed megaclip/train.py` at world size 2: damaged shards (cut inside a
member, cut inside a header, a pipe command failing after some output, a shard deleted while the
run goes on) are skipped, counted and named, and training finishes; a wrong caption key ends the
run long before the loader's timeout with a message naming what the samples hold."""
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from megaclip.data.shards import iter_shard
from megaclip.make.writer import write_shards
from tests.conftest import ROOT, free_port


def _command(synthetic, out, shards, *extra):
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "megaclip/train.py",
            "--deepspeed_config", "ds_configs/zero3_cpu.json", "--config", "clip_tiny_synthetic",
            f"data.train_shards={shards}", f"data.tokenizer={synthetic}/spm.model",
            'eval.shards=""', f"train.output_dir={out}", "train.micro_batch_size=8",
            "data.shuffle_buffer=8", "data.workers=1", "optim.warmup_steps=2", *extra]


def _small_shards(synthetic, out, count):
    samples = iter_shard(str(synthetic / "train" / "shard-000000.tar"))
    return write_shards((s for _, s in zip(range(count * 10), samples)), str(out), maxcount=10)


@pytest.mark.distributed
@pytest.mark.slow
def test_training_goes_on_past_damaged_and_deleted_shards(tmp_path, synthetic):
    good = _small_shards(synthetic, tmp_path / "good", 14)
    doomed = _small_shards(synthetic, tmp_path / "doomed", 1)[0]
    with open(good[0], "rb") as f:
        data = f.read()
    with tarfile.open(good[0]) as t:
        members = t.getmembers()
    cut_member, cut_header = str(tmp_path / "cut-member.tar"), str(tmp_path / "cut-header.tar")
    with open(cut_member, "wb") as f:
        f.write(data[:members[7].offset_data + 50])
    with open(cut_header, "wb") as f:
        f.write(data[:members[7].offset + 100])
    pipe = f"pipe:head -c {len(data) // 2} {good[1]}; exit 3"
    shards = "::".join(good + [cut_member, cut_header, pipe, doomed])
    out = tmp_path / "run"
    # Epochs over 18 shards split over 2 ranks: each rank reads its 9 in about 9 steps, so every
    # shard is read at least twice after the doomed one is deleted at step 5. (No limit on bad
    # shards here: 4 in 18 could come first in a rank's order.)
    cmd = _command(synthetic, out, shards, "train.steps=30", "train.log_every=5",
                   "train.ckpt_every=0", "data.resampled=false",
                   "data.max_bad_shard_fraction=1.0")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    stdout = []
    for line in proc.stdout:
        stdout.append(line)
        if line.startswith("step 5/30 ") and os.path.exists(doomed):
            os.remove(doomed)
    stderr = proc.stderr.read()
    assert proc.wait(timeout=600) == 0, "".join(stdout)[-3000:] + stderr[-3000:]
    assert not os.path.exists(doomed)
    for url, reason in ((cut_member, "ReadError: unexpected end of data"),
                        (cut_header, "ReadError: truncated inside a header"),
                        (pipe, "command exited with status 3"),
                        (doomed, "file does not exist")):
        assert f"skipping shard {url} (rank " in stderr and f"): {reason}" in stderr, url
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["train/skipped_shards"] for r in rows if "train/skipped_shards" in r]
    assert len(skipped) == 6 and skipped == sorted(skipped) and skipped[-1] >= 7
    assert any("| skipped_shards " in line for line in stdout)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_wrong_caption_key_ends_the_run_with_the_keys_found(tmp_path, synthetic):
    shards = f"{synthetic}/train/shard-{{000000..000003}}.tar"
    t0 = time.perf_counter()
    proc = subprocess.run(_command(synthetic, tmp_path / "run", shards, "data.caption_key=text",
                                   "train.steps=5"),
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    assert "samples in a row could not be used (data.max_bad_samples_in_a_row)" in proc.stderr
    assert "no '.text' member; samples have: jpg, txt" in proc.stderr
    # It ends as soon as max_bad_samples_in_a_row samples fail, not at the loader's 300 s
    # timeout (the bound leaves room for a busy 2-core machine).
    assert elapsed < 240, f"took {elapsed:.0f} s"


@pytest.mark.distributed
@pytest.mark.slow
def test_a_broken_dataset_stops_with_the_first_bad_shards_named(tmp_path, synthetic):
    good = _small_shards(synthetic, tmp_path / "good", 4)
    gone = [str(tmp_path / f"gone-{i}.tar") for i in range(4)]
    proc = subprocess.run(_command(synthetic, tmp_path / "run", "::".join(good + gone),
                                   "train.steps=40", "train.log_every=2", "train.ckpt_every=0",
                                   "data.max_bad_shard_fraction=0.1"),
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "4 of 8 shards" in proc.stderr and "do not exist (read as bad shards)" in proc.stderr
    error = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert "shards read so far are bad, clearly more than data.max_bad_shard_fraction=0.1" in error
    assert "gone-" in error and "file does not exist" in error
