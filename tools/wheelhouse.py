#!/usr/bin/env python3
"""A wheelhouse: every wheel megaclip needs (requirements.txt and their dependencies, DeepSpeed
built as a pure-Python wheel whose ops compile just in time), for a named Python version and
platform, so that a machine without network installs from it.

  build    on a machine with network: resolve, download, build deepspeed's wheel, and write
           requirements.txt (what to install) and wheelhouse.json (what it holds) beside them.
  install  on the machine without network: pip install --no-index --find-links from it, into
           the interpreter's environment, or (--target) only what that interpreter lacks, into a
           private folder to put on PYTHONPATH; an installed torch is never touched.

Standard library and pip only: it runs with a bare python3.
"""
from __future__ import annotations

import argparse
import email.parser
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = """examples:
  bash tools/wheelhouse.sh build --python 3.12 --out wheels/            # everything, torch too
  bash tools/wheelhouse.sh build --python 3.12 --no-torch --out wheels/ # the machine has a torch
  bash tools/wheelhouse.sh install --from wheels/                       # into this python's env
  bash tools/wheelhouse.sh install --from wheels/ --target runs/site    # only what is missing
"""
MANIFEST = "wheelhouse.json"
# Left out by --no-torch: torch, its CUDA libraries and the packages built against it.
TORCH_FAMILY = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def platforms(platform: str) -> list[str]:
    """pip does not widen ``--platform``: manylinux_2_28_x86_64 -> every manylinux tag it covers."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if m is None:
        return [platform]
    glibc, arch = int(m.group(1)), m.group(2)
    tags = [f"manylinux_2_{v}_{arch}" for v in range(glibc, 4, -1)]
    tags += [f"manylinux{alias}_{arch}" for alias, v in (("2014", 17), ("2010", 12), ("1", 5))
             if v <= glibc]
    return tags + [f"linux_{arch}"]


def requirement_lines(path: str) -> list[str]:
    out = []
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def req_name(line: str) -> str:
    return norm(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0])


def pip(*args: str, python: str = sys.executable) -> None:
    cmd = [python, "-m", "pip", *args]
    print("+ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        fail(f"pip {args[0]} failed (above)")


def wheel_requires(path: str) -> list[str]:
    """Requires-Dist of a wheel, without extras-only lines."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    return [r for r in msg.get_all("Requires-Dist") or [] if "extra ==" not in r]


def build(args) -> int:
    if not os.path.isfile(args.requirements):
        fail(f"--requirements {args.requirements}: no such file")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        fail(f"--out {args.out}: the folder is not empty (--force adds to it)")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    lines = requirement_lines(args.requirements)
    pins = {req_name(ln): ln for ln in lines}
    target = ["--only-binary=:all:", "--python-version", args.python, "--implementation", "cp",
              "--abi", "cp" + args.python.replace(".", ""), "--abi", "abi3", "--abi", "none"]
    for tag in platforms(args.platform):
        target += ["--platform", tag]
    with tempfile.TemporaryDirectory() as tmp:
        # DeepSpeed publishes only a source archive: build its wheel (ops compile where it runs).
        ds = pins.pop("deepspeed", None)
        extra = []
        if ds:
            pip("wheel", "--no-deps", "-q", "-w", args.out, ds)
            wheel = sorted(glob.glob(os.path.join(args.out, "deepspeed-*.whl")))[-1]
            extra = wheel_requires(wheel)
        req_file = os.path.join(tmp, "resolve.txt")
        with open(req_file, "w") as f:
            f.write("\n".join(list(pins.values()) + extra) + "\n")
        report = os.path.join(tmp, "report.json")
        # Resolved with torch, so that every version agrees with the pinned one; downloaded
        # without it when --no-torch.
        pip("install", "--dry-run", "--ignore-installed", "-q", "--report", report, "--target",
            os.path.join(tmp, "t"), *target, "-r", req_file)
        resolved = {norm(i["metadata"]["name"]): i["metadata"]["version"]
                    for i in json.load(open(report))["install"]}
    keep = {n: v for n, v in resolved.items() if not (args.no_torch and TORCH_FAMILY.match(n))}
    t1 = time.time()
    pip("download", "--no-deps", "-q", "-d", args.out, *target,
        *[f"{n}=={v}" for n, v in sorted(keep.items())])
    if ds:
        keep["deepspeed"] = re.split(r"==", ds)[-1]
    install = [ln for n, ln in ((req_name(x), x) for x in lines)
               if not (args.no_torch and TORCH_FAMILY.match(n))]
    with open(os.path.join(args.out, "requirements.txt"), "w") as f:
        f.write("# what tools/wheelhouse.py install installs from this folder\n"
                + "\n".join(install) + "\n")
    with open(os.path.join(args.out, MANIFEST), "w") as f:
        json.dump({"python": args.python, "platform": args.platform, "torch": not args.no_torch,
                   "packages": dict(sorted(keep.items()))}, f, indent=1)
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(args.out, "*.whl")))
    print(f"wheelhouse {args.out}: {len(keep)} packages, {size / 2**20:.0f} MiB, for Python "
          f"{args.python} on {args.platform}{' without torch' if args.no_torch else ''} "
          f"(resolved in {t1 - t0:.0f} s, downloaded in {time.time() - t1:.0f} s)", flush=True)
    return 0


def installed(python: str, extra_path: str = "") -> dict[str, str]:
    """Distributions the interpreter sees (name -> version), without the PYTHONPATH of ours."""
    code = ("import importlib.metadata as m, json; print(json.dumps({d.metadata['Name']: d.version "
            "for d in m.distributions() if d.metadata['Name']}))")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path:
        env["PYTHONPATH"] = extra_path
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, check=True)
    return {norm(k): v for k, v in json.loads(out.stdout).items()}


def install(args) -> int:
    house = os.path.abspath(args.source)
    manifest_path = os.path.join(house, MANIFEST)
    if not os.path.isfile(manifest_path):
        fail(f"--from {args.source}: no {MANIFEST} there (make one with "
             f"bash tools/wheelhouse.sh build)")
    manifest = json.load(open(manifest_path))
    t0 = time.time()
    if not args.target:
        pip("install", "--no-index", "--find-links", house, "-r",
            os.path.join(house, "requirements.txt"), python=args.python)
        print(f"installed from {house} in {time.time() - t0:.0f} s", flush=True)
        return 0
    target = os.path.abspath(args.target)
    stamp = os.path.join(target, ".wheelhouse.json")
    if os.path.isfile(stamp) and json.load(open(stamp)) == manifest:
        print(f"{target}: already holds what {house} adds", flush=True)
        return 0
    have = installed(args.python)
    missing = sorted(n for n in manifest["packages"] if n not in have)
    if not missing:
        print(f"{args.python} has every package of {house}", flush=True)
    else:
        os.makedirs(target, exist_ok=True)
        pip("install", "--no-index", "--find-links", house, "--no-deps", "--upgrade", "-q",
            "--target", target, *[f"{n}=={manifest['packages'][n]}" for n in missing],
            python=args.python)
        print(f"installed {len(missing)} package(s) into {target} in {time.time() - t0:.0f} s: "
              f"{', '.join(missing)}", flush=True)
    with open(stamp, "w") as f:
        json.dump(manifest, f)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/wheelhouse.sh", description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download and build every wheel (needs network)",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--out", required=True, help="the wheelhouse folder")
    b.add_argument("--python", default="%d.%d" % sys.version_info[:2],
                   help="the Python version that will install it (default: this one's)")
    b.add_argument("--platform", default="manylinux_2_28_x86_64",
                   help="the newest manylinux tag the machine takes (default: %(default)s)")
    b.add_argument("--no-torch", action="store_true",
                   help="leave out torch, torchvision and their CUDA libraries (the machine's "
                        "image has its own)")
    b.add_argument("--requirements", default=os.path.join(ROOT, "requirements.txt"))
    b.add_argument("--force", action="store_true", help="add to a folder that is not empty")
    i = sub.add_parser("install", help="install from a wheelhouse, with no network",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("--from", dest="source", default=os.path.join(ROOT, "wheels"),
                   help="the wheelhouse folder (default: wheels/ in the repository)")
    i.add_argument("--python", default=sys.executable, help="the interpreter to install for")
    i.add_argument("--target", default="",
                   help="install only what the interpreter lacks, into this folder (put it on "
                        "PYTHONPATH); nothing of the interpreter's own is touched")
    args = p.parse_args(argv)
    if args.command == "build":
        if not re.fullmatch(r"3\.\d+", args.python):
            fail(f"--python {args.python}: give a version such as 3.12")
        return build(args)
    return install(args)


if __name__ == "__main__":
    sys.exit(main())
