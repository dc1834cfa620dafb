#!/usr/bin/env python
"""Step time and peak memory of several objectives on the same model and batch, as ratios to
the first one, measured in one invocation (each objective in its own process, so peak memory
is its own). A figure printer, not a test."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megaclip.errors import UserError, run_cli  # noqa: E402

EXAMPLE = """examples:
  python tools/bench_objectives.py --preset vit_b16 --batch 64 --grad-checkpointing   # one GPU, bf16
  python tools/bench_objectives.py --deepspeed_config ds_configs/zero3_cpu.json      # tiny model, CPU, fp32
  python tools/bench_objectives.py --objectives clip,silc objective.local_global.local_crops=4
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tools/bench_objectives.py", description=__doc__,
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", default="clip,maskclip,maskclip_flip,silc,maskclip+silc",
                   help="objective presets, comma separated; ratios are to the first")
    p.add_argument("--preset", default="tiny", help="model preset (tiny, vit_b16, vit_l14)")
    p.add_argument("--batch", type=int, default=32, help="micro-batch per process")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--deepspeed_config", default=os.path.join(ROOT, "ds_configs", "zero3_bf16.json"),
                   help="DeepSpeed JSON (default: ds_configs/zero3_bf16.json, which needs a GPU; "
                        "on the CPU pass ds_configs/zero3_cpu.json)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides applied to every objective (after the flags above)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def overrides(args) -> list[str]:
    return [f"model.preset={args.preset}", f"train.micro_batch_size={args.batch}",
            f"model.grad_checkpointing={str(args.grad_checkpointing).lower()}", *args.overrides]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        from megaclip.engine.benchmark import measure
        from megaclip.engine.ds_config import load_ds_config
        result = measure(args.child, overrides(args), load_ds_config(args.deepspeed_config),
                         args.vocab, args.steps, args.warmup)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    names = [n for n in args.objectives.split(",") if n]
    if not names:
        raise UserError("--objectives is empty")
    results = []
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
               "--child", name, "--deepspeed_config", args.deepspeed_config]
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            if proc.returncode == 2 and proc.stderr.strip():  # the child's user error, as is
                raise UserError(proc.stderr.strip().splitlines()[-1].removeprefix("error: "))
            raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
        r = results[-1]
        mfu = f"  MFU {r['mfu']:.3f}" if r["mfu"] is not None else ""
        reserved = (f" (reserved {r['peak_reserved_gib']:.2f})" if "peak_reserved_gib" in r
                    else "")
        print(f"{name:>14}: {r['step_time_s'] * 1000:9.1f} ms/step  {r['samples_per_s']:8.1f} "
              f"samples/s  {r['tflops']:7.3f} model TFLOP/s{mfu}  peak {r['peak_mem_gib']:6.2f} "
              f"GiB{reserved}  ({r['params_m']:.1f}M params, {r['device']}, batch "
              f"{r['batch']}, {r['optimizer']})", flush=True)
    base = results[0]
    for r in results[1:]:
        print(f"{r['objective']} / {base['objective']}: time "
              f"{r['step_time_s'] / base['step_time_s']:.2f}x, peak memory "
              f"{r['peak_mem_gib'] / base['peak_mem_gib']:.2f}x "
              f"({r['peak_mem_gib']:.2f} vs {base['peak_mem_gib']:.2f} GiB), model FLOPs "
              f"{r['flops_per_sample'] / base['flops_per_sample']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    run_cli(main)
