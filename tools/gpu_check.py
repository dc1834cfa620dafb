#!/usr/bin/env python
"""The CUDA path on one GPU, in minutes: trains clip and maskclip at ViT-B/16 with
ds_configs/zero3_bf16.json (ZeRO-3, bf16, fused Adam), activation checkpointing on and off,
gradient accumulation 2, on a synthetic set it builds; checks that every loss is finite and
falls and that the EMA teacher moves, with every collective's device checked; prints samples/s,
model TFLOP/s, MFU against the GPU's bf16 peak and peak memory (allocated and reserved).
Without a GPU it says so and exits 0. Exit 1 when a check fails."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megaclip.errors import UserError, run_cli  # noqa: E402

EXAMPLE = """examples:
  bash tools/gpu_check.sh                      # the whole check, about ten minutes on one GPU
  bash tools/gpu_check.sh --objectives clip --checkpointing on --steps 20
"""
RUNS_OF = {"on": (True,), "off": (False,), "both": (True, False)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tools/gpu_check.sh", description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", default="clip,maskclip", help="objective presets, comma separated")
    p.add_argument("--checkpointing", choices=sorted(RUNS_OF), default="both",
                   help="activation checkpointing on, off or both")
    p.add_argument("--steps", type=int, default=30, help="optimiser steps per run")
    p.add_argument("--micro-batch", type=int, default=64, help="micro-batch (x2 accumulation)")
    p.add_argument("--preset", default="vit_b16", help="model preset")
    p.add_argument("--deepspeed_config", default=os.path.join(ROOT, "ds_configs", "zero3_bf16.json"))
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "gpu_check"),
                   help="synthetic set and run outputs (reused when present)")
    p.add_argument("--run-timeout", type=int, default=240, help="seconds allowed per run")
    p.add_argument("--json", default=None, help="also write every run's figures here")
    p.add_argument("--cpu", action="store_true",
                   help="run on the CPU anyway (with --preset tiny and --deepspeed_config "
                        "ds_configs/zero3_cpu.json): a test of this check itself")
    return p.parse_args(argv)


def tool(*args: str) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def synthetic_set(workdir: str, image_size: int) -> str:
    data = os.path.join(workdir, f"data{image_size}")
    if not os.path.isfile(os.path.join(data, "spm.model")):
        tool("tools/make_synthetic.py", "--out", data, "--train-samples", "4000",
             "--shard-size", "500", "--eval-per-class", "4", "--image-size", str(image_size))
        tool("tools/train_tokenizer.py", "--out", os.path.join(data, "spm"), "--vocab-size", "256",
             "--shards", os.path.join(data, "train", "shard-{000000..000007}.tar"))
    return data


def train(args, objective: str, checkpointing: bool, data: str, out: str) -> tuple[int, str]:
    cmd = [sys.executable, "megaclip/train.py", "--deepspeed_config", args.deepspeed_config,
           "--config", "clip_vitb16", f"model.preset={args.preset}",
           f"objective.preset={objective}", f"model.grad_checkpointing={str(checkpointing).lower()}",
           f"data.train_shards={data}/train/shard-{{000000..000007}}.tar",
           f"data.tokenizer={data}/spm.model", "data.workers=6", "data.shuffle_buffer=500",
           f"eval.shards={data}/eval/shard-000000.tar", f"eval.classes={data}/eval/classes.json",
           f"train.steps={args.steps}", f"train.micro_batch_size={args.micro_batch}",
           "train.grad_accum_steps=2", f"train.log_every={max(1, args.steps // 6)}",
           "train.ckpt_every=0", "train.keep_checkpoints=1", "optim.warmup_steps=5",
           f"train.output_dir={out}"]
    env = dict(os.environ, MEGACLIP_CHECK_COLLECTIVES="1")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=args.run_timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        return 124, f"{out or ''}\nstopped after {args.run_timeout} s (--run-timeout)"
    return proc.returncode, proc.stdout + proc.stderr


def gpu_listed() -> bool:
    """Whether the driver lists a GPU (then torch not seeing it is a broken install)."""
    try:
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and "GPU" in proc.stdout


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available() and not args.cpu:
        if gpu_listed():
            raise UserError("nvidia-smi lists a GPU but torch does not see it (torch "
                            f"{torch.__version__}, CUDA {torch.version.cuda}): a CPU-only torch, "
                            "or a driver older than torch's CUDA")
        print("gpu_check: no GPU visible (torch.cuda.is_available() is False): nothing to check "
              "here. Run it on a machine with a CUDA GPU.", flush=True)
        return 0
    from megaclip.config import load_config
    from megaclip.engine.metrics import peak_tflops
    from megaclip.models.presets import PRESETS
    from megaclip.reports import judge_training, read_metrics
    objectives = [o for o in args.objectives.split(",") if o]
    if not objectives or args.steps < 4:
        raise UserError("need at least one objective and --steps 4 or more")
    if args.preset not in PRESETS:
        raise UserError(f"unknown --preset '{args.preset}'; presets: {', '.join(PRESETS)}")
    image_size = PRESETS[args.preset]["vision"]["image_size"]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_tflops(torch.device("cuda"), torch.bfloat16) if torch.cuda.is_available() else None
    print(f"gpu_check on {name} (bf16 peak {peak or 'unknown'} TFLOP/s), torch "
          f"{torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    data = synthetic_set(args.workdir, image_size)
    results, failed = [], False
    for objective in objectives:
        for ckpt in RUNS_OF[args.checkpointing]:
            label = f"{objective}, checkpointing {'on' if ckpt else 'off'}"
            out = os.path.join(args.workdir, f"{objective}_ckpt{'on' if ckpt else 'off'}")
            if os.path.isdir(out):
                subprocess.run(["rm", "-rf", out], check=True)
            start = time.time()
            code, log = train(args, objective, ckpt, data, out)
            if code != 0:
                print(f"FAIL {label}: exit {code}\n{log[-4000:]}", flush=True)
                failed = True
                continue
            uses_teacher = load_config(None, [f"objective.preset={objective}"]).objective.uses_teacher
            problems, fig = judge_training(read_metrics(out), uses_teacher)
            if not fig:
                print(f"FAIL {label}: {'; '.join(problems)}", flush=True)
                failed = True
                continue
            optimiser = next((ln for ln in log.splitlines() if ln.startswith("optimiser: ")), "")
            fig.update(objective=objective, checkpointing=ckpt, wall_s=time.time() - start,
                       optimiser=optimiser.removeprefix("optimiser: ").split(";")[0])
            results.append(fig)
            failed |= bool(problems)
            mfu = f"{fig['mfu']:.3f}" if "mfu" in fig else "n/a"
            reserved = (f" / {fig['peak_reserved_gib']:.2f} GiB reserved"
                        if "peak_reserved_gib" in fig else "")
            print(f"{'FAIL' if problems else 'ok  '} {label}: {fig['samples_per_s']:.1f} samples/s, "
                  f"{fig['tflops_per_device']:.1f} model TFLOP/s, MFU {mfu}, peak memory "
                  f"{fig['peak_mem_gib']:.2f} GiB allocated{reserved}, data wait {fig['data_time_s'] * 1000:.0f} ms/step, loss "
                  f"{fig['loss_first']:.3f} -> {fig['loss_last']:.3f}, {fig['optimiser']} "
                  f"({fig['wall_s']:.0f} s)" + "".join(f"\n     {p}" for p in problems), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "peak_tflops": peak, "runs": results}, f, indent=1)
    print("gpu_check: " + ("FAILED" if failed else "all checks passed"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
