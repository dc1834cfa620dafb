"""tools/gpu_check.sh: a skip message and exit 0 without a GPU; the same checks, run through the
same code on the CPU (tiny model, fp32), pass and print their figures; the real check on a GPU."""
import json
import os
import subprocess

import pytest
import torch

from tests.conftest import ROOT


def gpu_check(*args, timeout=900):
    return subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_without_a_gpu_it_says_so_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: test_on_a_gpu runs the check")
    proc = gpu_check()
    assert proc.returncode == 0, proc.stderr
    assert "gpu_check: no GPU visible" in proc.stdout


@pytest.mark.slow
def test_the_checks_run_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "figures.json"
    proc = gpu_check("--cpu", "--preset", "tiny", "--deepspeed_config", "ds_configs/zero3_cpu.json",
                     "--steps", "8", "--micro-batch", "8", "--checkpointing", "off",
                     "--workdir", str(tmp_path / "work"), "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check: all checks passed" in proc.stdout
    runs = json.loads(out.read_text())["runs"]
    assert [r["objective"] for r in runs] == ["clip", "maskclip"]
    for r in runs:
        assert r["samples_per_s"] > 0 and r["peak_mem_gib"] > 0 and r["loss_last"] < r["loss_first"]
        assert r["optimiser"] == "torch AdamW (fused)"


@pytest.mark.gpu
def test_on_a_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no GPU visible")
    proc = gpu_check("--workdir", str(tmp_path), timeout=1200)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
