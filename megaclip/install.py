"""Which torch build a machine can run, from its NVIDIA driver (standard library only: it runs
before any environment exists, with the system's python3).

``tools/setup_env.sh`` asks ``python3 megaclip/install.py torch --shell`` which torch to install;
the trainer asks ``gpus_unseen_error`` why torch sees no GPU on a machine whose driver lists some.

The registry's torch wheels are CUDA 13 builds (driver R580 or newer); an older driver gets one of
the CUDA variants from torch's own index, the newest that the driver runs. Overrides, in order:
``MEGACLIP_WHEELHOUSE`` (a folder of wheels: install with no network), ``MEGACLIP_TORCH_INDEX``
(an index URL for torch and torchvision), ``MEGACLIP_TORCH_CUDA`` (``cu126``, ``cpu``, ``pypi``).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

TORCH_INDEX = "https://download.pytorch.org/whl/"
# The oldest Linux driver that runs each CUDA release fully (NVIDIA's CUDA toolkit release
# notes, "toolkit driver version"), and the oldest a release runs through minor-version
# compatibility (same major version: no PTX JIT of newer code, which torch's wheels do not need).
FULL_DRIVER = {"cu118": (520, 61, 5), "cu121": (530, 30, 2), "cu124": (550, 54, 14),
               "cu126": (560, 28, 3), "cu128": (570, 26, 0), "cu129": (575, 51, 3),
               "cu130": (580, 65, 6)}
COMPAT_DRIVER = {11: (450, 80, 2), 12: (525, 60, 13), 13: (580, 65, 6)}
# CUDA variants on torch's index for the pinned torch (requirements.txt). The registry's own
# wheel ("pypi") is a CUDA 13 build and runs on any driver that runs CUDA 13.
PUBLISHED = ("cu126", "cu128", "cu130")
PYPI_CUDA_MAJOR = 13
CHOICES = ("pypi", "cpu") + tuple(FULL_DRIVER)


class InstallError(ValueError):
    """A choice that cannot be made (bad override, a driver too old for every build): exit 2."""


def parse_driver(smi_output: str) -> Optional[tuple[int, ...]]:
    """The driver version in ``nvidia-smi --query-gpu=driver_version --format=csv,noheader``
    output (one line per GPU) or in plain ``nvidia-smi``'s header (``Driver Version: 535.104.05``);
    None when it holds none (no GPU, an error message)."""
    m = re.search(r"Driver Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", smi_output)
    if m is None:
        m = re.search(r"^\s*(\d{3,})\.(\d+)(?:\.(\d+))?\s*$", smi_output, re.MULTILINE)
    if m is None:
        return None
    return tuple(int(g or 0) for g in m.groups())


def version_text(driver: tuple[int, ...]) -> str:
    """As nvidia-smi writes it: 535.104.05."""
    return ".".join([str(driver[0])] + [f"{p:02d}" for p in driver[1:]])


def query_driver(which: Callable = shutil.which) -> Optional[tuple[int, ...]]:
    """The NVIDIA driver version as ``nvidia-smi`` reports it for the first GPU; None without
    ``nvidia-smi``, without a GPU, or when it fails."""
    if which("nvidia-smi") is None:
        return None
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_driver(proc.stdout) if proc.returncode == 0 else None


def variant_major(variant: str) -> int:
    return int(variant[2:4])  # cu118 -> 11, cu130 -> 13


def cuda_variant(driver: tuple[int, ...], published=PUBLISHED) -> tuple[Optional[str], str]:
    """(variant, why) for a driver: None for the registry's own wheel, else the newest published
    variant the driver fully supports, else the oldest one of a CUDA major version it runs by
    minor-version compatibility. An InstallError when it runs none."""
    ver = version_text(driver)
    if driver >= COMPAT_DRIVER[PYPI_CUDA_MAJOR]:
        return None, f"driver {ver} runs CUDA {PYPI_CUDA_MAJOR}: the registry's torch"
    full = [v for v in published if driver >= FULL_DRIVER[v]]
    if full:
        v = max(full, key=lambda x: FULL_DRIVER[x])
        return v, (f"driver {ver} is older than R580 (CUDA 13); {v} is the newest CUDA build "
                   f"of torch it supports (needs {version_text(FULL_DRIVER[v])}+)")
    compat = [v for v in published if driver >= COMPAT_DRIVER.get(variant_major(v), (10**4,))]
    if compat:
        v = min(compat, key=lambda x: FULL_DRIVER[x])
        return v, (f"driver {ver} is older than every published build's own driver; {v} runs "
                   f"on it through CUDA {variant_major(v)} minor-version compatibility")
    raise InstallError(f"NVIDIA driver {ver} is too old for every CUDA build of this torch "
                       f"({', '.join(published)}: driver {version_text(COMPAT_DRIVER[12])} or "
                       f"newer); upgrade the driver, or set MEGACLIP_TORCH_CUDA=cpu for the CPU "
                       f"build")


@dataclass(frozen=True)
class TorchChoice:
    tag: str  # "pypi" (the default: the environment key stays that of requirements.txt), ...
    pip_args: tuple[str, ...]  # extra pip arguments for torch and torchvision
    offline: bool  # every package comes from pip_args' folder (--no-index)
    why: str


def choose_torch(environ, driver: Optional[tuple[int, ...]]) -> TorchChoice:
    """The torch build to install, from the overrides in ``environ`` or the driver version
    (None: no nvidia-smi or no GPU)."""
    house = environ.get("MEGACLIP_WHEELHOUSE", "")
    if house:
        if not os.path.isdir(house):
            raise InstallError(f"MEGACLIP_WHEELHOUSE={house} is not a folder (make one with "
                               f"bash tools/wheelhouse.sh build)")
        house = os.path.abspath(house)
        return TorchChoice("wheelhouse-" + os.path.basename(house.rstrip("/")),
                           ("--no-index", "--find-links", house), True,
                           f"MEGACLIP_WHEELHOUSE is set: every package from {house}, no network")
    index = environ.get("MEGACLIP_TORCH_INDEX", "")
    if index:
        tag = "index-" + re.sub(r"[^A-Za-z0-9]+", "-", index.rstrip("/").rsplit("/", 1)[-1])
        return TorchChoice(tag, ("--index-url", index), False,
                           f"MEGACLIP_TORCH_INDEX is set: torch and torchvision from {index}")
    forced = environ.get("MEGACLIP_TORCH_CUDA", "")
    if forced:
        if forced not in CHOICES:
            raise InstallError(f"MEGACLIP_TORCH_CUDA={forced} is not a torch build; one of "
                               f"{', '.join(CHOICES)}")
        why = f"MEGACLIP_TORCH_CUDA={forced}"
        variant = None if forced == "pypi" else forced
    elif driver is None:
        return TorchChoice("pypi", (), False, "no NVIDIA GPU listed by nvidia-smi: the registry's "
                           "torch (it runs on the CPU too; MEGACLIP_TORCH_CUDA=cpu for the "
                           "smaller CPU-only build)")
    else:
        variant, why = cuda_variant(driver)
    if variant is None:
        return TorchChoice("pypi", (), False, why)
    return TorchChoice(variant, ("--index-url", TORCH_INDEX + variant), False, why)


def venv_key(requirements: bytes, choice: TorchChoice) -> str:
    """The cached environment's key: the hash of requirements.txt for the registry's torch (the
    key CI's cache has always had), of requirements.txt and the build's tag otherwise."""
    extra = b"" if choice.tag == "pypi" else f"\ntorch-build {choice.tag}\n".encode()
    return hashlib.sha256(requirements + extra).hexdigest()[:16]


def gpus_unseen_error(torch_cuda: Optional[str], environ=os.environ,
                      driver_of: Callable = query_driver) -> Optional[str]:
    """Where torch sees no GPU: a message when nvidia-smi lists one all the same (a torch built
    for a newer CUDA than the driver runs, or a CPU-only torch); None otherwise, or when
    CUDA_VISIBLE_DEVICES hides every GPU on purpose."""
    if environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return None
    driver = driver_of()
    if driver is None:
        return None
    ver = version_text(driver)
    if torch_cuda is None:
        build = "a CPU-only build"
    else:
        build = f"built for CUDA {torch_cuda}"
        major = int(torch_cuda.split(".")[0])
        if major in COMPAT_DRIVER and driver < COMPAT_DRIVER[major]:
            build += (f", which needs driver {version_text(COMPAT_DRIVER[major])} or newer")
    try:
        fix_variant, _ = cuda_variant(driver)
        fix = (f"MEGACLIP_TORCH_CUDA={fix_variant} bash tools/setup_env.sh" if fix_variant else
               "bash tools/setup_env.sh")
    except InstallError as e:
        fix = str(e)
    return (f"nvidia-smi lists a GPU (driver {ver}) but torch does not see it: this torch is "
            f"{build}. Install a torch for this driver ({fix}), or hide the GPUs with "
            f"CUDA_VISIBLE_DEVICES= to run on the CPU")


def missing_modules(modules) -> list[str]:
    import importlib
    import importlib.util
    importlib.invalidate_caches()
    return [m for m in modules if importlib.util.find_spec(m) is None]


def ensure_modules(modules, wheelhouse: str, target: str) -> str:
    """Make ``modules`` importable here and in the processes this one starts: what this Python
    lacks is installed from ``wheelhouse`` into ``target`` (tools/wheelhouse.py install
    --target: only the missing distributions, no network, the interpreter's own packages, its
    torch above all, untouched), which goes first on sys.path and PYTHONPATH (its bin/ on PATH:
    ninja). Returns a line for the log ("" when nothing was missing); a UserError (exit 2)
    naming the missing modules when there is no wheelhouse."""
    if os.path.isdir(target):
        _use_private(target)
    missing = missing_modules(modules)
    if not missing:
        return f"using packages from {target}" if os.path.isdir(target) else ""
    from megaclip.errors import UserError
    if not os.path.isfile(os.path.join(wheelhouse, "wheelhouse.json")):
        raise UserError(f"this Python lacks {', '.join(missing)} and there is no wheelhouse at "
                        f"{wheelhouse}: build one where there is network (bash tools/wheelhouse.sh "
                        f"build --python {sys.version_info[0]}.{sys.version_info[1]} --no-torch "
                        f"--out wheels/), carry it here and pass --wheelhouse")
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                        "wheelhouse.py")
    start = time.time()
    proc = subprocess.run([sys.executable, tool, "install", "--from", wheelhouse, "--target",
                           target], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"installing from {wheelhouse} failed:\n{proc.stdout[-3000:]}"
                        f"{proc.stderr[-3000:]}")
    _use_private(target)
    still = missing_modules(modules)
    if still:
        raise UserError(f"{wheelhouse} does not provide {', '.join(still)}")
    return (f"installed {', '.join(missing)} (and what they need) from {wheelhouse} into "
            f"{target} in {time.time() - start:.0f} s")


def _use_private(target: str) -> None:
    if target not in sys.path:
        sys.path.insert(0, target)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if target not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([target] + parts)
    bin_dir = os.path.join(target, "bin")
    if os.path.isdir(bin_dir) and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python3 megaclip/install.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python3 megaclip/install.py torch            # what it would pick, and why\n"
               "  MEGACLIP_TORCH_CUDA=cu126 python3 megaclip/install.py torch --shell")
    p.add_argument("what", choices=["torch"], help="what to choose")
    p.add_argument("--shell", action="store_true",
                   help="print VENV_KEY, TORCH_TAG, TORCH_PIP_ARGS, TORCH_OFFLINE, TORCH_WHY "
                        "for eval")
    p.add_argument("--requirements", default="requirements.txt",
                   help="the file the environment key hashes (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        choice = choose_torch(os.environ, query_driver())
        with open(args.requirements, "rb") as f:
            key = venv_key(f.read(), choice)
    except (InstallError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.shell:
        for k, v in (("VENV_KEY", key), ("TORCH_TAG", choice.tag), ("TORCH_PIP_ARGS", " ".join(map(shlex.quote, choice.pip_args))),
                     ("TORCH_OFFLINE", "1" if choice.offline else ""), ("TORCH_WHY", choice.why)):
            print(f"{k}={shlex.quote(v)}")
    else:
        print(f"torch build: {choice.tag} ({choice.why})"
              + (f"; pip {' '.join(choice.pip_args)}" if choice.pip_args else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
