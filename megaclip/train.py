"""megaclip training entry point.

    deepspeed megaclip/train.py --deepspeed_config ds_configs/zero3_bf16.json \\
        --config clip_vitb16 data.train_shards='/data/laion/{00000..41407}.tar' train.steps=100000
"""
from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script: import the package from the repository, not this folder's files.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from megaclip.errors import run_cli  # noqa: E402

EXAMPLE = """example:
  deepspeed --num_gpus 8 megaclip/train.py --deepspeed_config ds_configs/zero3_bf16.json \\
      --config clip_vitb16 data.train_shards='/data/shards/{000000..004095}.tar' \\
      data.tokenizer=/data/spm32k.model train.output_dir=runs/b16 --resume auto

  Overrides are section.key=value (YAML values): model.preset=vit_l14 train.steps=1000
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="megaclip/train.py", description="Pretrain a CLIP-family model on DeepSpeed.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="experiment file (YAML/JSON) or a bundled experiment name")
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (ds_configs/)")
    p.add_argument("--resume", default=None,
                   help="'auto' (newest complete checkpoint in the output dir, if any) or the "
                        "path of a checkpoint directory")
    p.add_argument("--stop_after_steps", type=int, default=0,
                   help="leave after this many steps of this invocation, with a checkpoint "
                        "(for time-sliced jobs); 0: run to train.steps")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megaclip.config import load_config
    from megaclip.engine.ds_config import load_ds_config
    cfg = load_config(args.config, args.overrides)
    ds = load_ds_config(args.deepspeed_config)
    from megaclip.engine.assembly import build_run
    from megaclip.engine.trainer import Trainer
    run = build_run(cfg, ds, args.resume, ds_source=args.deepspeed_config)
    trainer = Trainer(run, stop_after=args.stop_after_steps)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    run_cli(main)
