"""The objective benchmark runs every objective through the training engine and reports its
figures and ratios (timings are printed, never asserted)."""
import json

import pytest

from tests.conftest import run_tool


@pytest.mark.slow
def test_bench_objectives_prints_ratios(tmp_path):
    out = tmp_path / "bench.json"
    # maskclip_flip: image blocks as ZeRO-3 leaf modules beside a text tower run twice.
    proc = run_tool("bench_objectives.py", "--objectives", "clip,maskclip_flip,maskclip+silc",
                    "--steps", "1", "--warmup", "1", "--batch", "4", "--vocab", "512", "--json",
                    str(out), "--deepspeed_config", "ds_configs/zero3_cpu.json",
                    "objective.local_global.local_size=32", "objective.local_global.prototypes=256",
                    timeout=600)
    results = {r["objective"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"clip", "maskclip_flip", "maskclip+silc"}
    for r in results.values():
        assert r["step_time_s"] > 0 and r["peak_mem_gib"] > 0 and r["batch"] == 4
    # Same model and batch: the masked pass, teacher, decoders, MLM pass and SILC's second
    # global view and local views add model FLOPs.
    flops = {k: r["flops_per_sample"] for k, r in results.items()}
    assert flops["maskclip+silc"] > 2 * flops["clip"]
    assert "maskclip+silc / clip: time" in proc.stdout and "model FLOPs" in proc.stdout


def test_bench_objectives_unknown_preset_exits_2():
    proc = run_tool("bench_objectives.py", "--objectives", "nosuch,clip", "--steps", "1",
                    "--warmup", "0", "--batch", "2", "--vocab", "512", "--deepspeed_config",
                    "ds_configs/zero3_cpu.json", check=False, timeout=600)
    assert proc.returncode == 2 and "nosuch" in proc.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_bench_objectives_at_world_size_2_counts_the_teachers_collectives(tmp_path):
    """Under the real launcher at world size 2: the whole-copy teacher replaces its per-block
    gathers with one all-gather per step (same bytes); open_clip's step runs beside."""
    out = tmp_path / "bench.json"
    proc = run_tool("bench_objectives.py", "--world-size", "2", "--open-clip", "--objectives",
                    "clip,maskclip,maskclip@objective.teacher.whole_copy_max_gib=0",
                    "--steps", "2", "--warmup", "1", "--batch", "4", "--vocab", "512", "--json",
                    str(out), "--deepspeed_config", "ds_configs/zero3_cpu.json", timeout=900)
    results = {r["objective"]: r for r in json.loads(out.read_text())}
    clip, whole = results["clip"], results["maskclip"]
    per_block = results["maskclip@objective.teacher.whole_copy_max_gib=0"]
    assert clip["world_size"] == whole["world_size"] == 2 and clip["zero_stage"] == 3
    assert clip["teacher_forward"] is None and "once per optimiser step" in whole["teacher_forward"]
    assert per_block["teacher_forward"] == "gathered block by block"
    gathers = {k: r["comm"]["by_name"]["all_gather_into_tensor"]["calls"]
               for k, r in (("whole", whole), ("per_block", per_block), ("clip", clip))}
    depth = 4  # the tiny preset's image trunk: at least one gather per block, per forward
    assert gathers["per_block"] - gathers["whole"] >= depth
    assert gathers["whole"] > gathers["clip"]  # the student's bigger model, plus one
    assert whole["comm"]["bytes"] == pytest.approx(per_block["comm"]["bytes"], rel=1e-6)
    assert results["open_clip"]["step_time_s"] > 0
    assert "maskclip / clip: time" in proc.stdout and "clip / open_clip: time" in proc.stdout


def test_bench_objectives_bad_variant_exits_2():
    proc = run_tool("bench_objectives.py", "--objectives", "clip@zero_stage=7", "--steps", "1",
                    "--deepspeed_config", "ds_configs/zero3_cpu.json", check=False, timeout=600)
    assert proc.returncode == 2 and "zero_stage" in proc.stderr
