"""ZeRO-3 through the real DeepSpeed launcher: world size 2 equals world size 1, parameters are
partitioned, and the bf16 / ZeRO-2 configs train."""
import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "engine", "zero_steps.py")


def launch(ds_config, n_procs, out, steps=5, overrides=()):
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    proc = subprocess.run([deepspeed, "--num_gpus", str(n_procs), "--master_port",
                           str(free_port()), SCRIPT,
                           os.path.join(ROOT, "ds_configs", ds_config), str(out), str(steps),
                           *overrides],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


@pytest.mark.distributed
def test_world_size_2_matches_world_size_1_and_partitions_in_halves(tmp_path):
    one = launch("zero3_cpu.json", 1, tmp_path / "ws1.json")
    two = launch("zero3_cpu.json", 2, tmp_path / "ws2.json")
    assert one["losses"][-1] < one["losses"][0]  # it trains
    assert one["collectives_checked"] and two["collectives_checked"]  # on every rank's device
    for a, b in zip(one["losses"], two["losses"]):
        assert math.isclose(a, b, rel_tol=1e-4), (one["losses"], two["losses"])
    # Every parameter is partitioned (persistence threshold 0): each rank holds ceil(n / 2).
    assert len(two["partition"]) > 50
    for local, full in two["partition"]:
        assert local == math.ceil(full / 2), (local, full)
    total_local = sum(p[0] for p in two["partition"])
    total = sum(p[1] for p in two["partition"])
    assert 0.49 < total_local / total < 0.51


@pytest.mark.distributed
def test_leaf_blocks_train_exactly_like_per_module_hooks(tmp_path):
    """clip runs each tower once, so every block of both towers is one DeepSpeed leaf module
    (activation checkpointing on, gradient accumulation 2, world size 2): the losses of
    per-module hooks, bit for bit."""
    accum = "train.grad_accum_steps=2"
    leaves = launch("zero3_cpu.json", 2, tmp_path / "leaf.json", steps=6, overrides=(accum,))
    hooks = launch("zero3_cpu.json", 2, tmp_path / "hooks.json", steps=6,
                   overrides=(accum, "model.zero3_leaf_blocks=false"))
    assert leaves["leaf_blocks"] == 4 + 3  # the tiny preset's vision and text depths
    assert hooks["leaf_blocks"] == 0
    assert leaves["finite"] and leaves["losses"] == hooks["losses"]


@pytest.mark.distributed
@pytest.mark.parametrize("ds_config", ["zero3_bf16.json", "zero2_bf16.json"])
def test_bf16_configs_train(tmp_path, ds_config):
    report = launch(ds_config, 2, tmp_path / "r.json", steps=4)
    assert report["finite"] and report["losses"][-1] < report["losses"][0]
    assert report["collectives_checked"]


@pytest.mark.slow
@pytest.mark.distributed
def test_compiled_blocks_train_like_eager_ones_under_zero3(tmp_path):
    """model.compile_blocks at world size 2 under ZeRO-3 (graphs broken at DeepSpeed's
    parameter hooks, activation checkpointing on): the eager run's losses."""
    eager = launch("zero3_cpu.json", 2, tmp_path / "eager.json", steps=3)
    compiled = launch("zero3_cpu.json", 2, tmp_path / "compiled.json", steps=3,
                      overrides=("model.compile_blocks=true",))
    for a, b in zip(eager["losses"], compiled["losses"]):
        assert math.isclose(a, b, rel_tol=1e-4), (eager["losses"], compiled["losses"])
