"""megaclip/install.py: which torch build a machine's NVIDIA driver runs (fake nvidia-smi
outputs), the overrides, the environment key CI's cache relies on, and the trainer's error when
nvidia-smi lists a GPU that torch does not see."""
import hashlib
import os
import stat
import subprocess
import sys

import pytest

from megaclip.install import (InstallError, TorchChoice, choose_torch, cuda_variant,
                              gpus_unseen_error, parse_driver, venv_key, version_text)
from tests.conftest import ROOT

CSV = "535.104.05\n535.104.05\n"  # nvidia-smi --query-gpu=driver_version --format=csv,noheader
HEADER = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 570.86.15              Driver Version: 570.86.15      CUDA Version: 12.8     |
|-----------------------------------------+------------------------+----------------------+
"""


def test_driver_version_from_nvidia_smi_outputs():
    assert parse_driver(CSV) == (535, 104, 5)
    assert parse_driver(HEADER) == (570, 86, 15)
    assert parse_driver("580.65\n") == (580, 65, 0)
    assert parse_driver("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
                        "driver.") is None
    assert parse_driver("") is None


@pytest.mark.parametrize("driver, want", [
    ((535, 104, 5), "cu126"),   # older than every build's own driver: CUDA 12 compatibility
    ((550, 54, 15), "cu126"),
    ((560, 35, 3), "cu126"),    # R560 runs CUDA 12.6 fully
    ((570, 86, 15), "cu128"),
    ((575, 57, 8), "cu128"),    # cu129 is not published for this torch
    ((580, 65, 6), None),       # CUDA 13: the registry's own torch
    ((590, 44, 1), None),
])
def test_the_newest_build_the_driver_runs(driver, want):
    variant, why = cuda_variant(driver)
    assert variant == want and version_text(driver) in why


def test_a_driver_too_old_for_every_build_is_an_error_naming_it():
    with pytest.raises(InstallError, match="470.82.01 is too old.*MEGACLIP_TORCH_CUDA=cpu"):
        cuda_variant((470, 82, 1))
    assert cuda_variant((470, 82, 1), published=("cu118",))[0] == "cu118"


def test_choices_and_overrides(tmp_path):
    assert choose_torch({}, None).tag == "pypi"  # no GPU: what CI has always installed
    c = choose_torch({}, (535, 104, 5))
    assert c.tag == "cu126" and c.pip_args == ("--index-url", "https://download.pytorch.org/whl/cu126")
    assert choose_torch({"MEGACLIP_TORCH_CUDA": "cpu"}, (580, 65, 6)).pip_args[-1].endswith("/cpu")
    assert choose_torch({"MEGACLIP_TORCH_CUDA": "pypi"}, (535, 104, 5)).tag == "pypi"
    with pytest.raises(InstallError, match="MEGACLIP_TORCH_CUDA=cu99 is not a torch build"):
        choose_torch({"MEGACLIP_TORCH_CUDA": "cu99"}, None)
    idx = choose_torch({"MEGACLIP_TORCH_INDEX": "https://mirror.example/whl/cu128"}, None)
    assert idx.pip_args == ("--index-url", "https://mirror.example/whl/cu128") and not idx.offline
    house = choose_torch({"MEGACLIP_WHEELHOUSE": str(tmp_path)}, (535, 104, 5))
    assert house.offline and house.pip_args == ("--no-index", "--find-links", str(tmp_path))
    with pytest.raises(InstallError, match="is not a folder"):
        choose_torch({"MEGACLIP_WHEELHOUSE": str(tmp_path / "none")}, None)


def test_the_registry_torch_keeps_the_environment_key_of_requirements_txt():
    req = open(os.path.join(ROOT, "requirements.txt"), "rb").read()
    assert venv_key(req, TorchChoice("pypi", (), False, "")) == hashlib.sha256(req).hexdigest()[:16]
    assert venv_key(req, TorchChoice("cu126", (), False, "")) != venv_key(req, TorchChoice("pypi", (), False, ""))


def fake_nvidia_smi(folder, output: str, code: int = 0) -> dict:
    """A PATH whose nvidia-smi prints ``output``."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "nvidia-smi")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\ncat <<'EOF'\n{output}EOF\nexit {code}\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return dict(os.environ, PATH=f"{folder}:{os.environ['PATH']}")


def test_the_command_reads_a_fake_nvidia_smi(tmp_path):
    env = fake_nvidia_smi(tmp_path / "bin", CSV)
    env.pop("MEGACLIP_TORCH_CUDA", None)
    proc = subprocess.run([sys.executable, "megaclip/install.py", "torch", "--shell"], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_TAG=cu126" in proc.stdout and "download.pytorch.org/whl/cu126" in proc.stdout
    env["MEGACLIP_TORCH_CUDA"] = "nonsense"
    proc = subprocess.run([sys.executable, "megaclip/install.py", "torch"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "MEGACLIP_TORCH_CUDA=nonsense" in proc.stderr


def test_gpus_listed_but_unseen_names_the_driver_and_the_wheels_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin", CSV)["PATH"])
    msg = gpus_unseen_error("13.2", environ={})
    assert "driver 535.104.05" in msg and "CUDA 13.2" in msg and "580.65.06 or newer" in msg
    assert "MEGACLIP_TORCH_CUDA=cu126" in msg
    assert "a CPU-only build" in gpus_unseen_error(None, environ={})
    assert gpus_unseen_error("13.2", environ={"CUDA_VISIBLE_DEVICES": ""}) is None  # hidden on purpose
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin2", "No devices were found\n", 6)["PATH"])
    assert gpus_unseen_error("13.2", environ={}) is None


def test_the_trainer_stops_naming_the_driver_when_torch_does_not_see_the_gpu(tmp_path):
    """Before anything is built: the device choice sees the fake nvidia-smi (exit 2, no trace)."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    env = fake_nvidia_smi(tmp_path / "bin", CSV)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, "megaclip/train.py", "--deepspeed_config",
                           "ds_configs/zero3_bf16.json", "--config", "clip_tiny_synthetic",
                           f"train.output_dir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "nvidia-smi lists a GPU (driver 535.104.05)" in proc.stderr
    assert f"CUDA {torch.version.cuda}" in proc.stderr and "Traceback" not in proc.stderr
