#!/usr/bin/env python
"""Build WebDataset shards from an image folder and a captions file (CSV, TSV or JSONL).

Every image is opened and decoded before it is written; rows with a missing, undecodable or
oversized image, or an empty caption, are skipped and summarised at the end.
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

EXAMPLE = """example:
  python tools/make_shards.py --images photos/ --captions captions.csv --out shards/ \\
      --shard-size 10000
  (captions.csv has a header with an image column: image|file|filename|path and a caption
   column: caption|text|txt|title; image paths are relative to --images)
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder the image paths are relative to")
    p.add_argument("--captions", required=True, help="CSV, TSV or JSONL file")
    p.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    p.add_argument("--image-column")
    p.add_argument("--caption-column")
    p.add_argument("--max-pixels", type=int, default=89_478_485)
    args = p.parse_args(argv)
    if args.shard_size <= 0:
        raise UserError("--shard-size must be positive")
    import os
    if not os.path.isdir(args.images):
        raise UserError(f"image folder '{args.images}' does not exist")
    skipped: Counter = Counter()
    rows = tqdm(read_captions(args.captions, args.image_column, args.caption_column),
                desc="rows", unit="row", mininterval=1.0)
    written = Counter()

    def counted():
        for s in folder_samples(args.images, rows, args.max_pixels, skipped):
            written["n"] += 1
            yield s

    paths = write_shards(counted(), args.out, maxcount=args.shard_size)
    print(f"wrote {written['n']} samples in {len(paths)} shards: {shard_pattern(paths)}")
    total = sum(skipped.values())
    print(f"skipped {total} rows" + (": " + ", ".join(f"{k} {v}" for k, v in
                                                      sorted(skipped.items())) if total else ""))
    if written["n"] == 0:
        raise UserError("no valid samples: nothing was written")
    return 0


if __name__ == "__main__":
    run_cli(main)
