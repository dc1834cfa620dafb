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
  python tools/eval.py --checkpoint CKPT --shards 'eval/shard-{000000..000003}.tar' \\
      --classes eval/classes.json --json results.json
  python tools/eval.py --checkpoint CKPT --eval-set eval/pets --encoder teacher
  python tools/eval.py --checkpoint runs/demo/checkpoints/step00000400 --use-run-eval-set

The evaluation set is given on the command line. --use-run-eval-set takes the eval.shards and
eval.classes the checkpoint's config.yaml names, as local files only: a pipe: command or a URL
there is refused, since a checkpoint from elsewhere must not choose what runs.
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


def run_eval_set(checkpoint: str, cfg) -> tuple[str, str]:
    """(shards, classes) of the checkpoint's config, refused unless local files: a pipe: command
    or URL written in a checkpoint is never started."""
    from megaclip.data.shards import non_local
    from megaclip.errors import UserError
    where = f"the eval.shards of {checkpoint}/config.yaml"
    if not cfg.eval.shards or not cfg.eval.classes:
        raise UserError(f"{checkpoint}/config.yaml names no evaluation set (eval.shards, "
                        f"eval.classes); give --shards and --classes, or --eval-set")
    remote = non_local(cfg.eval.shards)
    if remote:
        shown = f" ({remote[0]})" if remote[0] != cfg.eval.shards else ""
        raise UserError(f"{where}, '{cfg.eval.shards}', names a command or URL{shown}: refusing "
                        f"to start what a checkpoint names; give the shards with --shards and "
                        f"--classes")
    if non_local(cfg.eval.classes):
        raise UserError(f"the eval.classes of {checkpoint}/config.yaml, '{cfg.eval.classes}', is "
                        f"not a local file; give --shards and --classes")
    return cfg.eval.shards, cfg.eval.classes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (.../stepNNNNNNNN)")
    p.add_argument("--eval-set", help="a folder from tools/make_eval_set.py: zero-shot and "
                                      "retrieval on its test split; with train and val splits, "
                                      "the probes fit on train, choose on val, score on test")
    p.add_argument("--shards", help="eval shards (a brace pattern; with --classes)")
    p.add_argument("--classes", help="classes JSON of --shards")
    p.add_argument("--use-run-eval-set", action="store_true",
                   help="the eval.shards and eval.classes of the checkpoint's config.yaml "
                        "(local files only: a pipe: command or URL there is refused)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--encoder", choices=("student", "teacher"), default="student",
                   help="image encoder of the probes (default: student)")
    p.add_argument("--no-probes", action="store_true",
                   help="zero-shot classification and retrieval only")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    from megaclip.errors import UserError
    if args.batch_size <= 0:
        raise UserError("--batch-size must be positive")
    given = [name for name, on in (("--eval-set", args.eval_set),
                                   ("--shards/--classes", args.shards or args.classes),
                                   ("--use-run-eval-set", args.use_run_eval_set)) if on]
    if len(given) != 1:
        raise UserError("give one evaluation set: --shards with --classes, --eval-set, or "
                        "--use-run-eval-set (the run's own local files)"
                        + (f"; got {' and '.join(given)}" if given else ""))
    if bool(args.shards) != bool(args.classes):
        raise UserError("--shards and --classes go together")

    from megaclip.checkpoint.inference import checkpoint_config, load_for_inference
    from megaclip.checkpoint.train_state import check_tokenizer
    from megaclip.data.eval_set import EvalSet
    from megaclip.data.tokenizer import Tokenizer
    from megaclip.eval.zeroshot import evaluate

    if args.use_run_eval_set:  # checked before the weights are read
        args.shards, args.classes = run_eval_set(args.checkpoint,
                                                 checkpoint_config(args.checkpoint))
    model, cfg = load_for_inference(args.checkpoint)
    for warning in check_tokenizer(args.checkpoint, cfg.data.tokenizer,
                                   advice=f"put the one it was trained with back at "
                                          f"{cfg.data.tokenizer} to evaluate it"):
        print(warning, file=sys.stderr)
    tokenizer = Tokenizer(cfg.data.tokenizer, cfg.model.text.context_length)

    def eval_set(shards, classes):
        return EvalSet(shards, classes, cfg.model.vision.image_size, cfg.data.mean, cfg.data.std,
                       cfg.data.image_keys, cfg.data.caption_key, cfg.data.max_image_pixels,
                       cfg.data.image_formats, cfg.data.max_member_bytes)
    parts = None
    if args.eval_set:
        splits = eval_set_splits(args.eval_set)
        classes = os.path.join(args.eval_set, "classes.json")
        data = eval_set(splits["test"], classes)
        if "train" in splits and "val" in splits:
            parts = (eval_set(splits["train"], classes), eval_set(splits["val"], classes))
    else:
        data = eval_set(args.shards, args.classes)
    results = evaluate(model, data, tokenizer, args.batch_size, torch.device("cpu"), torch.float32)
    if not args.no_probes:
        from megaclip.eval.probes import run_probes
        trunk = None
        if args.encoder == "teacher":
            from megaclip.teacher.state import consolidate_teacher
            from megaclip.models.vision import trunk_for
            trunk = trunk_for(cfg.model).eval()
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
