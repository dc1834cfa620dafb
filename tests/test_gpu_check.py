"""tools/gpu_check.sh: a skip message and exit 0 without a GPU; the same checks, run through the
same code on the CPU (tiny model, fp32), pass and print their figures, a JSON line per finished
run, and skip runs the budget cannot hold; a bare machine gets what it lacks from a wheelhouse
into a private folder; the real check on a GPU."""
import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from tests.conftest import ROOT


def gpu_check(*args, timeout=900):
    return subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=dict(os.environ, PYTHON=sys.executable))


def test_without_a_gpu_it_says_so_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: test_on_a_gpu runs the check")
    proc = gpu_check()
    assert proc.returncode == 0, proc.stderr
    assert "gpu_check: no GPU visible" in proc.stdout


def tiny_wheel(folder, name="mcfake_pkg", version="1.0") -> str:
    """A pure-Python wheel made by hand: ``import mcfake_pkg`` gives ``VALUE = 42``."""
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{name}-{version}.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL":
                 "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
        z.writestr(f"{name}-{version}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def fake_wheelhouse(tmp_path):
    """(a wheelhouse holding one tiny wheel and listing numpy too, a private target folder).
    numpy is installed here already: it stays the interpreter's own, not reinstalled."""
    house, target = tmp_path / "wheels", tmp_path / "site"
    house.mkdir()
    tiny_wheel(str(house))
    (house / "wheelhouse.json").write_text(json.dumps(
        {"python": "3", "platform": "any", "torch": False,
         "packages": {"mcfake-pkg": "1.0", "numpy": "0.0.1"}}))
    return house, target


def test_a_bare_machine_gets_what_it_lacks_from_the_wheelhouse_into_a_private_folder(tmp_path):
    house, target = fake_wheelhouse(tmp_path)
    code = ("import os, sys; from megaclip.install import ensure_modules; "
            f"print(ensure_modules(['mcfake_pkg', 'numpy'], {str(house)!r}, {str(target)!r})); "
            "import mcfake_pkg, subprocess; print('value', mcfake_pkg.VALUE); "
            "print(subprocess.run([sys.executable, '-c', 'import mcfake_pkg'], capture_output=True).returncode)")
    env = dict(os.environ, PYTHONPATH=ROOT, PIP_NO_INDEX="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"installed mcfake_pkg (and what they need) from {house} into {target}" in proc.stdout
    assert "value 42" in proc.stdout and proc.stdout.strip().endswith("0")  # children see it too
    assert (target / "mcfake_pkg").is_dir() and not (target / "numpy").exists()
    # Again: the private folder is reused, nothing installed.
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path))
    assert proc.returncode == 0 and f"using packages from {target}" in proc.stdout
    # No wheelhouse: an error naming what is missing and how to make one.
    code = ("from megaclip.install import ensure_modules; "
            f"ensure_modules(['mcfake_absent'], {str(tmp_path / 'none')!r}, {str(tmp_path / 't2')!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "this Python lacks mcfake_absent" in proc.stderr and "wheelhouse.sh build" in proc.stderr


@pytest.mark.slow
def test_the_checks_run_end_to_end_on_the_cpu(tmp_path):
    out, lines = tmp_path / "figures.json", tmp_path / "figures.jsonl"
    common = ["--cpu", "--micro-batch", "8", "--workdir", str(tmp_path / "work"), "--jsonl",
              str(lines)]
    proc = gpu_check(*common, "--objectives", "clip,maskclip", "--bench", "clip", "--steps", "8",
                     "--bench-steps", "2", "--checkpointing", "off", "--json", str(out),
                     "--budget", "1500")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check: all checks passed (3 run(s), 0 skipped and 0 cut" in proc.stdout
    runs = json.loads(out.read_text())["runs"]
    assert [r["run"] for r in runs] == ["train clip, checkpointing off",
                                        "bench clip beside open_clip",
                                        "train maskclip, checkpointing off"]
    for r in runs:
        assert r["samples_per_s"] > 0 and r["peak_mem_gib"] > 0 and not r["problems"]
    train = [r for r in runs if r["kind"] == "train"]
    assert all(r["loss_last"] < r["loss_first"] and r["optimiser"] == "torch AdamW (fused)"
               for r in train)
    assert runs[1]["ratio_to_open_clip"] > 0 and "megaclip / open_clip" in proc.stdout
    # A JSON line per finished run, as each ended: the same runs, in order.
    assert [json.loads(ln)["run"] for ln in lines.read_text().splitlines()] == [r["run"] for r in runs]
    # A budget too short for any run: each is skipped (a JSON line saying so), none fails.
    proc = gpu_check(*common, "--objectives", "clip", "--bench", "clip", "--budget", "60")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    skipped = [json.loads(ln) for ln in lines.read_text().splitlines()][3:]
    assert [r["run"] for r in skipped] == ["train clip, checkpointing on", "bench clip beside open_clip"]
    assert all("left of --budget 60" in r["skipped"] for r in skipped)
    assert "0 run(s), 2 skipped and 0 cut for time" in proc.stdout


@pytest.mark.gpu
def test_on_a_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no GPU visible")
    proc = gpu_check("--workdir", str(tmp_path), timeout=1200)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
