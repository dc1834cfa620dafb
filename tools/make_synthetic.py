#!/usr/bin/env python
"""Write the procedurally generated shapes set as WebDataset shards.

Writes OUT/train/shard-*.tar, OUT/eval/shard-*.tar and OUT/eval/classes.json (zero-shot class
names and prompt templates). Deterministic from --seed.
"""
from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: the package beside it, not an installed one
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaclip.make import synthetic  # noqa: E402
from megaclip.make.writer import shard_pattern, write_shards  # noqa: E402
from megaclip.errors import UserError, run_cli  # noqa: E402

EXAMPLE = """example:
  python tools/make_synthetic.py --out data/synthetic --train-samples 20000 --eval-per-class 10
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--train-samples", type=int, default=20000)
    p.add_argument("--eval-per-class", type=int, default=10,
                   help=f"held-out images per class ({len(synthetic.CLASSNAMES)} classes)")
    p.add_argument("--image-size", type=int, default=64, help="model input size (images are "
                   "stored 1.25x larger so random crops have room)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("train_samples", "eval_per_class", "image_size", "shard_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")

    side = synthetic.default_side(args.image_size)
    n_eval = args.eval_per_class * len(synthetic.CLASSNAMES)
    for split, count in (("train", args.train_samples), ("eval", n_eval)):
        samples = tqdm(synthetic.iter_split(split, count, args.seed, side), total=count,
                       desc=f"{split} samples", unit="img", mininterval=1.0)
        paths = write_shards(samples, os.path.join(args.out, split), maxcount=args.shard_size)
        print(f"{split}: {count} samples in {len(paths)} shards: {shard_pattern(paths)}")
    synthetic.write_classes(os.path.join(args.out, "eval", "classes.json"))
    print(f"eval classes: {os.path.join(args.out, 'eval', 'classes.json')} "
          f"({len(synthetic.CLASSNAMES)} classes, chance {synthetic.chance_accuracy():.4f})")
    return 0


if __name__ == "__main__":
    run_cli(main)
