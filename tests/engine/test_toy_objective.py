"""An objective term added from outside the package (tests/engine/toy_objective.py: a loss
module, a config section, a pass description) trains under ZeRO-3 at world size 2 through the
unchanged trainer, model builder and checkpoint code: its term is logged and weighted, and its
loss module's state is in the checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, free_port, synthetic_overrides


@pytest.mark.distributed
def test_a_registered_toy_objective_trains_two_steps_at_world_size_2(tmp_path, synthetic):
    out = tmp_path / "run"
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    proc = subprocess.run(
        [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()),
         "tests/engine/toy_objective.py", "--deepspeed_config", "ds_configs/zero3_cpu.json",
         "--config", "clip_tiny_synthetic", *synthetic_overrides(synthetic, out),
         "train.steps=2", "train.log_every=1", "train.micro_batch_size=8", "data.workers=0",
         "data.shuffle_buffer=20", "eval.shards=", "objective.align.weight=0.5"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ZeRO stage 3" in proc.stdout
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in rows if "train/align" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:  # weighted in the one place terms are summed
        assert 0 < r["train/align"] < 2
        assert r["train/loss"] == pytest.approx(r["train/clip"] + 0.5 * r["train/align"],
                                                rel=1e-5)
    ckpt = out / "checkpoints" / "step00000002"
    assert (ckpt / "COMPLETE").is_file()
    for rank in (0, 1):
        client = torch.load(ckpt / "client" / f"rank{rank:05d}.pt", weights_only=True)
        assert client["objective"]["align.steps_applied"].item() == 2
    assert "align:" in (out / "config.yaml").read_text()
