#!/usr/bin/env python
"""Build an evaluation set from your own labelled images: an ImageFolder tree (one subfolder per
class) or a labels CSV, split deterministically per class into named parts (for the linear
probe: train, val, test), with class names, prompt templates and optional per-pixel masks.

Writes OUT/<split>/shard-NNNNNN.tar (image, caption from the first template, class index,
mask.npy when --masks is given) and OUT/classes.json ({"classnames", "templates" and, with
--background-prompts, "background"}); point
eval.shards and eval.classes (or tools/eval.py --shards/--classes) at them. The set is written
beside OUT and renamed into place when whole: a folder that is not empty is refused unless
--force, which replaces it whole."""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: the package beside it, not an installed one
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaclip.errors import UserError, run_cli  # noqa: E402

EXAMPLE = """examples:
  python tools/make_eval_set.py --images imagenet/val --out eval/imagenet --splits test=1
  python tools/make_eval_set.py --images pets/ --out eval/pets --splits train=0.6,val=0.2,test=0.2 \\
      --classnames pets_names.txt --templates templates.txt
  python tools/make_eval_set.py --csv labels.csv --root photos/ --masks masks/ --out eval/seg
  python tools/make_eval_set.py --images imagenet/val --out eval/imagenet --force   # rebuild it
  (labels.csv: a header with image|path|file|filename and label|class|category columns; masks/
   mirrors the image paths with a .png or .npy mask per image: 0 background, 1 + class index,
   255 ignored)
"""


def parse_splits(spec: str) -> dict[str, float]:
    out = {}
    for part in spec.split(","):
        name, sep, frac = part.partition("=")
        try:
            value = float(frac)
        except ValueError:
            value = -1.0
        if not sep or not name or value <= 0:
            raise UserError(f"--splits '{spec}': expected NAME=FRACTION[,NAME=FRACTION...] with "
                            f"positive fractions")
        out[name] = value
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/make_eval_set.py", description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="ImageFolder root: one subfolder of images per class")
    src.add_argument("--csv", help="labels CSV (image path, label); see --root")
    p.add_argument("--root", default=".", help="folder the CSV's image paths are relative to")
    p.add_argument("--out", required=True, help="output folder (new or empty; see --force)")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out whole (renamed aside, removed once the new "
                        "set is in place)")
    p.add_argument("--splits", default="test=1", help="NAME=FRACTION,... (default: test=1)")
    p.add_argument("--classnames", help="class names: one per line in label order, or a JSON "
                                        "object {folder or CSV label: name}")
    p.add_argument("--templates", help="prompt templates, one per line with {} for the class "
                                       "(default: CLIP's 7-template ensemble)")
    p.add_argument("--masks", help="folder of per-pixel masks mirroring the image paths (.png or "
                                   ".npy; 0 background, 1 + class index, 255 ignored)")
    p.add_argument("--background-prompts", nargs="+", default=[], metavar="PROMPT",
                   help="with --masks whose label 0 is the background: prompts naming it, so "
                        "zero-shot segmentation scores it (otherwise label 0 is ignored)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-class split")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    args = p.parse_args(argv)
    if args.shard_size <= 0:
        raise UserError("--shard-size must be positive")
    splits = parse_splits(args.splits)

    from megaclip.data.eval_set import check_templates
    from megaclip.make import eval_set as eb
    from megaclip.make.writer import shard_pattern, write_shards
    from megaclip.outputs import check_out, output_folder
    inputs = [x for x in (args.images, args.csv, args.root, args.masks, args.classnames,
                          args.templates) if x]
    check_out([args.out], args.force, inputs=inputs)
    if args.images:
        folders, items = eb.folder_items(args.images)
        root = args.images
    else:
        folders, items = eb.csv_items(args.csv, args.root)
        root = args.root
    classnames = eb.read_classnames(args.classnames, folders)
    templates = eb.read_templates(args.templates)
    check_templates(args.background_prompts, "--background-prompts", placeholder=False)
    if args.masks and not os.path.isdir(args.masks):
        raise UserError(f"mask folder '{args.masks}' does not exist")
    with output_folder(args.out, args.force, inputs=inputs) as tmp:
        for name, part in eb.split_items(items, splits, args.seed).items():
            paths = write_shards(eb.samples(part, classnames, templates, root, args.masks, name),
                                 os.path.join(tmp, name), maxcount=args.shard_size)
            paths = [os.path.join(args.out, name, os.path.basename(p)) for p in paths]
            print(f"{name}: {len(part)} images in {len(paths)} shards: {shard_pattern(paths)}")
        with open(os.path.join(tmp, "classes.json"), "w") as f:
            meta = {"classnames": classnames, "templates": templates}
            if args.background_prompts:
                meta["background"] = list(args.background_prompts)
            json.dump(meta, f, indent=1)
    classes_file = os.path.join(args.out, "classes.json")
    print(f"classes: {classes_file} ({len(classnames)} classes, {len(templates)} templates, "
          f"chance {1 / len(classnames):.4f})" + (", with masks" if args.masks else ""))
    return 0


if __name__ == "__main__":
    run_cli(main)
