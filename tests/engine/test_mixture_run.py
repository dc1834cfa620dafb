"""A two-source mixture end to end through `deepspeed megaclip/train.py` at world size 2: the
synthetic set and a copy with other captions (txt and json fields, several caption keys), the
copy finite (one epoch) with data.on_source_exhausted=stop. A run stopped after a checkpoint
and resumed logs the same losses and per-source counters and ends at the same step, with the
same parameters, as an uninterrupted one, and that last checkpoint records why training
ended: a resume from it trains no further (unless the stream changed)."""
import json
import subprocess
from types import SimpleNamespace

import pytest
import torch

from megaclip.checkpoint.io import consolidate
from megaclip.engine.trainer import Trainer
from tests.conftest import ROOT, launch_prefix, synthetic_overrides
from tests.data.recaption import recaption


def train(out, synthetic, copy, *extra):
    overrides = [*synthetic_overrides(synthetic, out), "data.train_shards="]
    sources = (f"data.sources=[{{name: shapes, shards: '{synthetic}/train/shard-{{000000..000003}}"
               f".tar', weight: 0.5}}, {{name: recaptioned, shards: '{copy}/shard-{{000000..000003}}"
               f".tar', weight: 0.5, resampled: false, epochs: 1, caption_keys: {{txt: 0.5, "
               f"'json:caption_2': 0.3, 'json:caption_3': 0.2}}}}]")
    cmd = [*launch_prefix(2), "megaclip/train.py", "--deepspeed_config",
           "ds_configs/zero3_cpu.json", "--config", "clip_tiny_synthetic", *overrides, sources,
           "data.on_source_exhausted=stop", "train.steps=12", "train.ckpt_every=3",
           "train.log_every=1", "train.micro_batch_size=4", "data.shuffle_buffer=8",
           "optim.warmup_steps=2", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def rows(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "train/loss" in r}


@pytest.mark.distributed
@pytest.mark.slow
def test_a_mixture_resumes_exactly_counts_per_source_and_ends_with_its_source(
        tmp_path, synthetic):
    copy = tmp_path / "copy"
    recaption(str(synthetic / "train"), str(copy), per_shard=6)  # 12 samples per rank
    a, b = tmp_path / "a", tmp_path / "b"
    log_a, err_a = train(a, synthetic, copy)
    ended = next(line for line in log_a.splitlines() if line.startswith("training ends after"))
    last = int(ended.split()[4])
    assert 3 < last < 12 and "source 'recaptioned' ran out for rank" in ended
    assert "the run stops after this step (data.on_source_exhausted=stop)" in err_a
    assert "final zero-shot" in log_a
    train(b, synthetic, copy, "--stop_after_steps", "3")
    log_b, _ = train(b, synthetic, copy, "--resume", "auto")
    assert "resumed from step00000003 at step 3" in log_b and ended in log_b

    # Losses and per-source counters of the resumed steps are those of the uninterrupted run.
    ra, rb = rows(a), rows(b)
    assert sorted(ra) == list(range(1, last + 1)) and sorted(rb) == sorted(ra)
    keys = ["train/loss"] + [f"data/{s}/{c}" for s in ("shapes", "recaptioned")
                             for c in ("samples", "bad_samples", "bad_shards")]
    for step in range(4, last + 1):
        assert [ra[step][k] for k in keys] == [rb[step][k] for k in keys], step
    for step, r in ra.items():  # cumulative, and every sample of every step is counted once
        assert r["data/shapes/samples"] + r["data/recaptioned/samples"] == step * 8
    share = ra[last]["data/recaptioned/samples"] / (last * 8)
    assert 0.3 < share < 0.7, share
    sa = consolidate(str(a / "checkpoints" / f"step{last:08d}"))
    sb = consolidate(str(b / "checkpoints" / f"step{last:08d}"))
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)

    # The last checkpoint records why training ended: a resume from it trains no further.
    notes = [torch.load(b / "checkpoints" / f"step{last:08d}" / "client" / f"rank{r:05d}.pt",
                        weights_only=True)["data_ended"] for r in (0, 1)]
    assert all(notes) and any(note in ended for note in notes)


def test_a_resume_after_the_data_ran_out_trains_no_further_unless_the_stream_changed(capsys):
    def trainer(ended, resumed, mode):
        t = Trainer.__new__(Trainer)
        t.state = SimpleNamespace(data_ended=ended, step=5)
        t.run = SimpleNamespace(loader=SimpleNamespace(state=SimpleNamespace(resumed=resumed)))
        t.cfg = SimpleNamespace(data=SimpleNamespace(on_source_exhausted=mode))
        t.log = SimpleNamespace(text=print, close=lambda: None)
        return t
    done = trainer("source 'b' ran out for rank 0 worker 0 after 12 samples", True, "stop")
    assert done._data_ran_out_before()
    assert "nothing left to train: training ended at step 5 when source 'b' ran out" in \
        capsys.readouterr().out
    for ended, resumed, mode in (("", True, "stop"), ("x", False, "stop"), ("x", True, "drop")):
        t = trainer(ended, resumed, mode)
        assert not t._data_ran_out_before() and t.state.data_ended == ""
