#!/usr/bin/env python
"""The evaluations of a megaclip checkpoint (one process): zero-shot classification and
image-text retrieval; a linear probe on frozen image features (the set cut 50/20/30% per class
into train/val/test, L2 chosen on val); with per-pixel masks in the set (tools/make_eval_set.py
--masks, or the synthetic set), a dense probe on frozen patch tokens and zero-shot segmentation
from patch-text similarity, both as mIoU. Printed as a table and written as JSON."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if __package__ in (None, ""):  # run as a script: the package beside it, not an installed one
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaclip.errors import run_cli  # noqa: E402

EXAMPLE = """example:
  python tools/eval.py --checkpoint runs/demo/checkpoints/step00000400
  python tools/eval.py --checkpoint CKPT --shards 'eval/shard-{000000..000003}.tar' \\
      --classes eval/classes.json --json results.json
  python tools/eval.py --checkpoint CKPT --eval-set eval/pets --encoder teacher
"""


def eval_set_splits(folder: str) -> dict[str, str]:
    """{split: shard pattern} of a make_eval_set folder; "test" is its only split if alone."""
    import glob

    from megaclip.make.writer import shard_pattern
    from megaclip.errors import UserError
    if not os.path.isfile(os.path.join(folder, "classes.json")):
        raise UserError(f"'{folder}' has no classes.json: is it a tools/make_eval_set.py folder?")
    found = {}
    for sub in sorted(os.listdir(folder)):
        shards = sorted(glob.glob(os.path.join(folder, sub, "shard-*.tar")))
        if shards:
            found[sub] = shard_pattern(shards)
    if "test" not in found and len(found) == 1:
        found["test"] = next(iter(found.values()))
    if "test" not in found:
        raise UserError(f"'{folder}' has no test split (found: {', '.join(found) or 'none'})")
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (.../stepNNNNNNNN)")
    p.add_argument("--eval-set", help="a folder from tools/make_eval_set.py: zero-shot and "
                                      "retrieval on its test split; with train and val splits, "
                                      "the probes fit on train, choose on val, score on test")
    p.add_argument("--shards", help="eval shards (default: the eval.shards the run used)")
    p.add_argument("--classes", help="classes JSON (default: the eval.classes the run used)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--encoder", choices=("student", "teacher"), default="student",
                   help="image encoder of the probes (default: student)")
    p.add_argument("--no-probes", action="store_true",
                   help="zero-shot classification and retrieval only")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        from megaclip.errors import UserError
        raise UserError("--batch-size must be positive")

    from megaclip.checkpoint.inference import load_for_inference
    from megaclip.data.eval_set import EvalSet
    from megaclip.data.tokenizer import Tokenizer
    from megaclip.eval.zeroshot import evaluate

    model, cfg = load_for_inference(args.checkpoint)
    tokenizer = Tokenizer(cfg.data.tokenizer, cfg.model.text.context_length)

    def eval_set(shards, classes):
        return EvalSet(shards, classes, cfg.model.vision.image_size, cfg.data.mean, cfg.data.std,
                       cfg.data.image_keys, cfg.data.caption_key)
    parts = None
    if args.eval_set:
        splits = eval_set_splits(args.eval_set)
        classes = os.path.join(args.eval_set, "classes.json")
        data = eval_set(splits["test"], classes)
        if "train" in splits and "val" in splits:
            parts = (eval_set(splits["train"], classes), eval_set(splits["val"], classes))
    else:
        data = eval_set(args.shards or cfg.eval.shards, args.classes or cfg.eval.classes)
    results = evaluate(model, data, tokenizer, args.batch_size, torch.device("cpu"), torch.float32)
    if not args.no_probes:
        from megaclip.eval.probes import run_probes
        trunk = None
        if args.encoder == "teacher":
            from megaclip.teacher.state import consolidate_teacher
            from megaclip.models.vision import build_trunk
            v = cfg.model.vision
            trunk = build_trunk(v.image_size, v.patch_size, v.width, v.depth, v.heads,
                                v.mlp_ratio).eval()
            trunk.load_state_dict({k[len("trunk."):]: t for k, t in
                                   consolidate_teacher(args.checkpoint).items()
                                   if k.startswith("trunk.")})
        results.update(run_probes(model, data, tokenizer, args.batch_size, torch.device("cpu"),
                                  torch.float32, trunk, parts))
    print(f"{args.checkpoint}: {len(data)} images, {len(data.classnames)} classes "
          f"(chance {1 / len(data.classnames):.4f})")
    for k, v in results.items():
        print(f"  {k:18s} {v:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    run_cli(main)
