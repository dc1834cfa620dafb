"""The objective benchmark runs every objective through the training engine and reports its
figures and ratios (timings are printed, never asserted)."""
import json

import pytest

from tests.conftest import run_tool


@pytest.mark.slow
def test_bench_objectives_prints_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_tool("bench_objectives.py", "--objectives", "clip,maskclip+silc",
                    "--steps", "1", "--warmup", "1", "--batch", "4", "--vocab", "512", "--json",
                    str(out), "--deepspeed_config", "ds_configs/zero3_cpu.json",
                    "objective.local_global.local_size=32", "objective.local_global.prototypes=256",
                    timeout=600)
    results = {r["objective"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"clip", "maskclip+silc"}
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
