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


@pytest.mark.slow
@pytest.mark.distributed
def test_every_objective_trains_with_leaf_blocks_exactly_like_per_module_hooks(tmp_path, synthetic):
    """maskclip+silc runs the image tower over three inputs (whole views, masked view, local
    crops) and the text tower over two (caption, masked caption), each in one call per block:
    every block of both towers and both decoders is a leaf, through the real trainer at world
    size 2 with gradient accumulation, and the losses are those of per-module hooks."""
    from tests.conftest import synthetic_overrides
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    losses = {}
    for leaf in ("true", "false"):
        out = tmp_path / leaf
        proc = subprocess.run(
            [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()),
             "megaclip/train.py", "--deepspeed_config", "ds_configs/zero3_cpu.json",
             "--config", "clip_tiny_synthetic", *synthetic_overrides(synthetic, out),
             "objective.preset=maskclip+silc", f"model.zero3_leaf_blocks={leaf}",
             "train.steps=3", "train.log_every=1", "train.micro_batch_size=4",
             "train.grad_accum_steps=2", "data.workers=0", "data.shuffle_buffer=20",
             "eval.shards=", "train.ckpt_every=0"],
            capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        losses[leaf] = [{k: v for k, v in r.items() if k.startswith("train/")
                         and k.split("/")[1] in ("loss", "clip", "distill", "local_global", "mlm")}
                        for r in rows if "train/loss" in r]
        assert ("ZeRO-3 leaf blocks: visual 4, text 3, patch_decoder" in proc.stdout) == (leaf == "true"), proc.stdout[-3000:]
    assert len(losses["true"]) == 3 and set(losses["true"][0]) >= {
        "train/distill", "train/local_global", "train/mlm"}
    for a, b in zip(losses["true"], losses["false"]):
        for k in a:
            assert math.isclose(a[k], b[k], rel_tol=1e-5), (k, losses)


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
