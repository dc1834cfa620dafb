"""tools/wheelhouse.py: bad input is exit 2 naming it; pip's --platform widened to the manylinux
tags a machine takes; an install from a folder with no network (a tiny hand-made wheel), into a
private folder, only what the interpreter lacks. (A real build needs the registry: README.)"""
import os
import subprocess
import sys

from tests.conftest import ROOT, run_tool
from tests.test_gpu_check import fake_wheelhouse

sys.path.insert(0, os.path.join(ROOT, "tools"))
import wheelhouse  # noqa: E402


def test_bad_input_is_exit_2_naming_it(tmp_path):
    proc = run_tool("wheelhouse.py", "build", "--python", "three", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2 and "--python three" in proc.stderr
    (tmp_path / "x").write_text("")
    proc = run_tool("wheelhouse.py", "build", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2 and "is not empty" in proc.stderr
    proc = run_tool("wheelhouse.py", "install", "--from", str(tmp_path / "none"), check=False)
    assert proc.returncode == 2 and "no wheelhouse.json there" in proc.stderr
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "setup_env.sh"), "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "MEGACLIP_TORCH_CUDA" in proc.stdout


def test_platform_tags_cover_older_manylinux():
    tags = wheelhouse.platforms("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_27_x86_64" in tags
    assert "manylinux2014_x86_64" in tags and "manylinux1_x86_64" in tags
    assert wheelhouse.platforms("macosx_11_0_arm64") == ["macosx_11_0_arm64"]
    assert wheelhouse.req_name("Open_Clip_Torch==3.3.0") == "open-clip-torch"


def test_install_into_a_private_folder_only_what_is_missing(tmp_path):
    house, target = fake_wheelhouse(tmp_path)
    env = dict(os.environ, PIP_NO_INDEX="1")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "wheelhouse.py"), "install", "--from",
           str(house), "--target", str(target)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "installed 1 package(s)" in proc.stdout and "mcfake-pkg" in proc.stdout
    assert (target / "mcfake_pkg" / "__init__.py").is_file() and not (target / "numpy").exists()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "already holds what" in proc.stdout
