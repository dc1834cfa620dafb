#!/usr/bin/env python
"""Build WebDataset shards from an image folder and a captions file (CSV, TSV or JSONL).

Every image is opened and decoded before it is written; rows with a missing, undecodable or
oversized image, or an empty caption, are skipped and summarised at the end. The shards are
written beside --out and renamed into place when all are done: a folder that is not empty is
refused unless --force, which replaces it whole (no old shard is left among the new ones).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: the package beside it, not an installed one
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaclip.make.ingest import folder_samples, read_captions  # noqa: E402
from megaclip.make.writer import shard_pattern, write_shards  # noqa: E402
from megaclip.errors import UserError, run_cli  # noqa: E402
from megaclip.outputs import check_out, output_folder  # noqa: E402

EXAMPLE = """example:
  python tools/make_shards.py --images photos/ --captions captions.csv --out shards/ \\
      --shard-size 10000
  python tools/make_shards.py --images photos/ --captions captions.csv --out shards/ --force
  (the same, replacing the shards/ made before)
  (captions.csv has a header with an image column: image|file|filename|path and a caption
   column: caption|text|txt|title; image paths are relative to --images)
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder the image paths are relative to")
    p.add_argument("--captions", required=True, help="CSV, TSV or JSONL file")
    p.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar (new or "
                                                "empty; see --force)")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out whole (renamed aside, removed once the new "
                        "shards are in place)")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    p.add_argument("--image-column")
    p.add_argument("--caption-column")
    p.add_argument("--max-pixels", type=int, default=89_478_485)
    args = p.parse_args(argv)
    if args.shard_size <= 0:
        raise UserError("--shard-size must be positive")
    if not os.path.isdir(args.images):
        raise UserError(f"image folder '{args.images}' does not exist")
    check_out([args.out], args.force, inputs=[args.images, args.captions])
    skipped: Counter = Counter()
    rows = tqdm(read_captions(args.captions, args.image_column, args.caption_column),
                desc="rows", unit="row", mininterval=1.0)
    written = Counter()

    def counted():
        for s in folder_samples(args.images, rows, args.max_pixels, skipped):
            written["n"] += 1
            yield s

    def summary() -> str:
        total = sum(skipped.values())
        return f"skipped {total} rows" + (": " + ", ".join(
            f"{k} {v}" for k, v in sorted(skipped.items())) if total else "")

    with output_folder(args.out, args.force, inputs=[args.images, args.captions]) as tmp:
        paths = [os.path.join(args.out, os.path.basename(path))
                 for path in write_shards(counted(), tmp, maxcount=args.shard_size)]
        if written["n"] == 0:
            print(summary())
            raise UserError(f"no valid samples: nothing was written ({args.out} is as it was)")
    print(f"wrote {written['n']} samples in {len(paths)} shards: {shard_pattern(paths)}")
    print(summary())
    return 0


if __name__ == "__main__":
    run_cli(main)
