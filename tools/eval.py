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
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (.../stepNNNNNNNN)")
    p.add_argument("--shards", help="eval shards (default: the eval.shards the run used)")
    p.add_argument("--classes", help="classes JSON (default: the eval.classes the run used)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--encoder", choices=("student", "teacher"), default="student",
                   help="image encoder of the probes (default: student)")
    p.add_argument("--no-probes", action="store_true",
                   help="zero-shot classification and retrieval only")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)

    from megaclip.checkpoint import load_for_inference
    from megaclip.data.eval_set import EvalSet
    from megaclip.data.tokenizer import Tokenizer
    from megaclip.evaluation import evaluate

    model, cfg = load_for_inference(args.checkpoint)
    tokenizer = Tokenizer(cfg.data.tokenizer, cfg.model.text.context_length)
    data = EvalSet(args.shards or cfg.eval.shards, args.classes or cfg.eval.classes,
                   cfg.model.vision.image_size, cfg.data.mean, cfg.data.std,
                   cfg.data.image_keys, cfg.data.caption_key)
    results = evaluate(model, data, tokenizer, args.batch_size, torch.device("cpu"), torch.float32)
    if not args.no_probes:
        from megaclip.probes import run_probes
        trunk = None
        if args.encoder == "teacher":
            from megaclip.checkpoint import consolidate_teacher
            from megaclip.models.vision import build_trunk
            v = cfg.model.vision
            trunk = build_trunk(v.image_size, v.patch_size, v.width, v.depth, v.heads,
                                v.mlp_ratio).eval()
            trunk.load_state_dict({k[len("trunk."):]: t for k, t in
                                   consolidate_teacher(args.checkpoint).items()
                                   if k.startswith("trunk.")})
        results.update(run_probes(model, data, tokenizer, args.batch_size, torch.device("cpu"),
                                  torch.float32, trunk))
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
