#!/usr/bin/env python
"""Held-out results of finished runs, grouped by name: each run's last evaluation, then the mean
and sample standard deviation per group (for seed comparisons of objectives)."""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaclip.errors import UserError, run_cli  # noqa: E402

EXAMPLE = """example:
  python tools/compare_runs.py clip='runs/cmp/clip_s*' maskclip='runs/cmp/maskclip_s*'
  python tools/compare_runs.py --metrics zeroshot_top1,i2t_R@1 a=runs/a1,runs/a2 b=runs/b1
"""


def parse_group(spec: str) -> tuple[str, list[str]]:
    name, sep, dirs = spec.partition("=")
    if not sep or not name or not dirs:
        raise UserError(f"'{spec}': expected NAME=RUN_DIR[,RUN_DIR...] (globs allowed)")
    runs = []
    for pattern in dirs.split(","):
        matched = sorted(d for d in glob.glob(pattern) if os.path.isdir(d))
        if not matched:
            raise UserError(f"group {name}: '{pattern}' matches no run directory")
        runs.extend(matched)
    return name, runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/compare_runs.py", description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("groups", nargs="+", metavar="NAME=RUN_DIRS",
                   help="a group name and its run directories, comma separated, globs allowed")
    p.add_argument("--metrics", default="zeroshot_top1,zeroshot_top5,i2t_R@1,t2i_R@1",
                   help="metrics to summarise, comma separated")
    p.add_argument("--json", help="also write the summary here")
    args = p.parse_args(argv)

    from megaclip.reports import latest_eval, summarise
    metrics = [m for m in args.metrics.split(",") if m]
    groups = {}
    for spec in args.groups:
        name, runs = parse_group(spec)
        results = []
        for run in runs:
            r = latest_eval(run)
            results.append(r)
            print(f"{name:>10} {run}: step {int(r['step'])}  "
                  + "  ".join(f"{m} {r[m]:.4f}" for m in metrics if m in r))
        groups[name] = results
    summary = summarise(groups, metrics)
    print()
    print(f"{'group':>10} {'n':>2}  " + "  ".join(f"{m:>17}" for m in metrics))
    for name, s in summary.items():
        cells = "  ".join(f"{s[m][0]:.4f} ± {s[m][1]:.4f}".rjust(17) for m in metrics)
        print(f"{name:>10} {s['n']:>2}  {cells}   (steps {','.join(map(str, s['steps']))})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    run_cli(main)
