#!/usr/bin/env python
"""Samples/s per data-loader worker: megaclip's training loader against open_clip's own
WebDataset pipeline, on the same shards and transform (decode, random resized crop, normalise,
tokenise, batch).

Writes shards of 256 px JPEGs with captions (or uses --shards) and a SentencePiece tokenizer (or
--tokenizer), then measures each system at each worker count, alternating systems, each run in a
fresh process. Prints samples/s and samples/s per worker per run, then the median ratio
megaclip / open_clip per worker count. --parent measures another megaclip checkout (the code
before a change) in the same alternation, and prints megaclip / parent as well.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, ROOT)

from megaclip.errors import UserError, run_cli  # noqa: E402

EXAMPLE = """example:
  python tools/bench_data.py --workers 1 2 --repeats 3
  python tools/bench_data.py --shards 'shards/shard-{000000..000099}.tar' --tokenizer spm32k.model
  python tools/bench_data.py --systems megaclip --tokenizer spm32k.model --set \
      'sources=[{name: laion, shards: "a/{0..9}.tar", weight: 0.8}, {name: cc, shards: "b/{0..9}.tar", weight: 0.2}]'
  git worktree add /tmp/parent HEAD~1 && python tools/bench_data.py --parent /tmp/parent \\
      --systems megaclip parent --workers 1
"""


def child(spec: dict) -> int:
    """One measurement (run by the driver in a fresh process); prints its figures as JSON."""
    import importlib.util
    if spec.get("root"):  # megaclip from another checkout; this module from this one
        sys.path.insert(0, spec["root"])
        for name in [m for m in sys.modules if m == "megaclip" or m.startswith("megaclip.")]:
            del sys.modules[name]
    where = os.path.join(ROOT, "megaclip", "bench", "data.py")
    module_spec = importlib.util.spec_from_file_location("megaclip_data_bench", where)
    bench = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench)
    print(json.dumps(bench.run_one(spec)), flush=True)
    return 0


def run(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"{spec['system']} with {spec['workers']} worker(s) failed:\n"
                        f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3, help="runs of each system per worker count")
    p.add_argument("--systems", nargs="+", default=["megaclip", "open_clip"],
                   choices=["megaclip", "open_clip", "parent"])
    p.add_argument("--parent", default="", help="another megaclip checkout, measured as 'parent'")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=40, help="timed batches per run")
    p.add_argument("--skip", type=int, default=-1,
                   help="batches before timing (default: 2 x workers + 2)")
    p.add_argument("--shards", default="", help="existing shards (default: write them)")
    p.add_argument("--tokenizer", default="", help="SentencePiece model (default: train one)")
    p.add_argument("--shard-count", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--image-side", type=int, default=256, help="side of the written JPEGs")
    p.add_argument("--device", default="auto", help="where batches go: auto (cuda if any), cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="data.* settings for megaclip, e.g. jpeg_draft=false; sources=[...] "
                        "measures that mixture instead of the shards")
    p.add_argument("--json", default="", help="also write the runs and ratios here")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return child(json.loads(args.one))
    if min(args.workers) < 1 or args.repeats < 1 or args.batches < 1 or args.batch < 1:
        raise UserError("--workers, --repeats, --batches and --batch must be >= 1")
    if "parent" in args.systems and not os.path.isdir(os.path.join(args.parent, "megaclip")):
        raise UserError(f"--systems parent needs --parent <megaclip checkout>; "
                        f"got {args.parent!r}")
    overrides = [f"data.{item}" for item in args.set]

    from megaclip.config import load_config
    from megaclip.bench import data as bench
    cfg = load_config(None, overrides).data  # unknown keys and bad values: a UserError
    work = tempfile.mkdtemp(prefix="megaclip-bench-data-")
    pattern = args.shards
    if not pattern:
        print(f"writing {args.shard_count} shards of {args.shard_size} {args.image_side} px "
              f"JPEGs to {work}", flush=True)
        pattern = bench.write_bench_shards(os.path.join(work, "shards"), args.shard_count,
                                           args.shard_size, args.image_side)
    spm = args.tokenizer or bench.train_bench_tokenizer(os.path.join(work, "spm"))
    base = {"shards": pattern, "tokenizer": spm, "batch": args.batch, "skip": args.skip,
            "image_size": args.image_size, "batches": args.batches, "device": args.device,
            "crop_scale": list(cfg.crop_scale), "mean": list(cfg.mean), "std": list(cfg.std)}
    print(f"batch {args.batch}, image {args.image_size}, {args.batches} timed batches per run, "
          f"device {args.device}", flush=True)
    runs = []
    for rep in range(args.repeats):
        for workers in args.workers:
            for system in args.systems:
                spec = {**base, "system": system, "workers": workers,
                        "root": args.parent if system == "parent" else "",
                        "overrides": overrides if system == "megaclip" else []}
                row = {"system": system, "workers": workers, "repeat": rep, **run(spec)}
                runs.append(row)
                print(f"run {rep}  {system:<9s} workers {workers}: {row['samples_per_s']:7.1f} "
                      f"samples/s, {row['per_worker']:7.1f} per worker", flush=True)
    ratios = {}
    for workers in args.workers:
        med = {s: statistics.median(r["per_worker"] for r in runs
                                    if r["system"] == s and r["workers"] == workers)
               for s in args.systems}
        line = ", ".join(f"{s} {v:.1f}" for s, v in med.items())
        for other in ("open_clip", "parent"):
            if "megaclip" in med and other in med:
                ratios[f"megaclip/{other}@{workers}"] = med["megaclip"] / med[other]
                line += f"; megaclip / {other} {med['megaclip'] / med[other]:.2f}x"
        print(f"workers {workers}, median samples/s per worker: {line}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "ratios": ratios, "settings": base}, f, indent=1)
    return 0


if __name__ == "__main__":
    run_cli(main)
