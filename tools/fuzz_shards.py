"""Fuzz the shard reader and the sample decoder for a fixed time: valid shards damaged at random
(bit flips, huge or garbage header sizes, extended headers, digit runs, cuts, gzip) are read the
way training reads them, under a memory cap. Prints inputs tried, samples decoded, samples and
shards skipped as bad, crashes (anything else: must be 0), the slowest input and peak memory.
A figure printer, not a test; exit 1 if anything crashed."""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaclip.errors import UserError, run_cli  # noqa: E402

EXAMPLE = """example:
  python tools/fuzz_shards.py --seconds 600 --memory-cap-gib 2
  python tools/fuzz_shards.py --seconds 60 --seed 3 --json fuzz.json
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300.0, help="time budget (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mutations")
    p.add_argument("--memory-cap-gib", type=float, default=2.0,
                   help="address-space limit of the process while fuzzing (default 2)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.memory_cap_gib <= 0:
        raise UserError("--seconds and --memory-cap-gib must be positive")
    from megaclip.bench.fuzz import run
    print(f"fuzzing the shard reader and decoder for {args.seconds:g} s (seed {args.seed}, "
          f"address space capped at {args.memory_cap_gib:g} GiB) ...", flush=True)
    r = run(args.seconds, args.seed, args.memory_cap_gib)
    print(f"inputs tried {r['inputs']}, samples decoded {r['samples']}, samples skipped as bad "
          f"{r['bad_samples']}, shards skipped as bad {r['bad_shards']}, crashes {r['crashes']}; "
          f"slowest input {r['slowest_input_s'] * 1000:.1f} ms, peak RSS {r['peak_rss_mib']:.0f} "
          f"MiB ({r['start_rss_mib']:.0f} MiB before the first input; address space capped "
          f"{r['memory_cap_gib']:g} GiB above the start)")
    for trace in r["first_crashes"]:
        print(trace)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 1 if r["crashes"] else 0


if __name__ == "__main__":
    run_cli(main)
