#!/usr/bin/env python
"""The CUDA path on one GPU within a short slot (--budget 330 s, set-up included): trains clip,
maskclip and silc at ViT-B/16 through megaclip/train.py with ds_configs/zero3_bf16.json (ZeRO-3,
bf16, fused Adam), gradient accumulation 2, on a synthetic set it builds, with every
collective's device checked; checks that every loss is finite and falls and that the EMA teacher
moves. Then times each objective's step on random data beside open_clip's own bf16 step on the
same architecture (in the same process: a ratio) and lists the host synchronisations inside the
timed steps by source line.

Each run's figures are printed as it ends and appended as one JSON line to --jsonl, so a check
cut short still leaves figures. A run starts only when the time left of --budget is enough for
it. On a bare machine (python3 and torch only), what is missing (deepspeed, webdataset, ...) is
installed from --wheelhouse into a private folder under --workdir, with no network; the
machine's own torch is never touched. Without a GPU it says so and exits 0. Exit 1 when a check
fails."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megaclip.errors import UserError, run_cli  # noqa: E402
from megaclip.install import ensure_modules, gpus_unseen_error  # noqa: E402

EXAMPLE = """examples:
  bash tools/gpu_check.sh                       # the whole check, budgeted for 6 minutes
  bash tools/gpu_check.sh --wheelhouse /scratch/wheels   # a bare machine: install from there
  bash tools/gpu_check.sh --objectives clip --bench clip --steps 20 --budget 600
"""
RUNS_OF = {"on": (True,), "off": (False,), "both": (True, False)}
# What megaclip and this check import; a bare machine gets the missing ones from the wheelhouse.
MODULES = ("deepspeed", "webdataset", "braceexpand", "hjson", "pydantic", "msgpack", "cpuinfo",
           "ninja", "einops", "open_clip", "sentencepiece", "timm", "yaml", "safetensors", "PIL",
           "numpy", "tensorboard", "tqdm")
FIRST_GUESS_S = {"train": 100, "bench": 60}  # a run's length before one of its kind has ended


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tools/gpu_check.sh", description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", default="clip,maskclip,silc",
                   help="objective presets to train, comma separated (default: %(default)s)")
    p.add_argument("--bench", default="clip,maskclip,silc",
                   help="objectives to time on random data with host synchronisations listed; "
                        "the first beside open_clip's step ('' for none)")
    p.add_argument("--checkpointing", choices=sorted(RUNS_OF), default="on",
                   help="activation checkpointing in the training runs: on, off or both")
    p.add_argument("--steps", type=int, default=12, help="optimiser steps per training run")
    p.add_argument("--bench-steps", type=int, default=6, help="timed steps per bench run (+3 warm-up)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="micro-batch, x2 accumulation (default 64; 8 with --cpu)")
    p.add_argument("--preset", default=None, help="model preset (default vit_b16; tiny with --cpu)")
    p.add_argument("--deepspeed_config", default=None,
                   help="default ds_configs/zero3_bf16.json; ds_configs/zero3_cpu.json with --cpu")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "gpu_check"),
                   help="synthetic set, run outputs and private packages (reused when present)")
    p.add_argument("--budget", type=int, default=None,
                   help="seconds for the whole check, set-up included: no run starts that would "
                        "end past it (default 330; 1200 with --cpu)")
    p.add_argument("--run-timeout", type=int, default=180, help="seconds allowed per run")
    p.add_argument("--jsonl", default=None,
                   help="each finished run's figures as a JSON line (default: WORKDIR/figures.jsonl)")
    p.add_argument("--json", default=None, help="also write every run's figures here at the end")
    p.add_argument("--wheelhouse", default=os.path.join(ROOT, "wheels"),
                   help="wheels for what this Python lacks (tools/wheelhouse.sh build; default: "
                        "wheels/ in the repository)")
    p.add_argument("--cpu", action="store_true",
                   help="run on the CPU anyway (tiny preset, ds_configs/zero3_cpu.json, "
                        "micro-batch 8): a test of this check itself")
    args = p.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.cpu else "vit_b16")
    args.micro_batch = args.micro_batch or (8 if args.cpu else 64)
    args.budget = args.budget or (1200 if args.cpu else 330)
    args.deepspeed_config = args.deepspeed_config or os.path.join(
        ROOT, "ds_configs", "zero3_cpu.json" if args.cpu else "zero3_bf16.json")
    args.jsonl = args.jsonl or os.path.join(args.workdir, "figures.jsonl")
    return args


def run_logged(cmd: list[str], timeout: float, env=None) -> tuple[int, str]:
    """(exit code, stdout + stderr); past ``timeout`` the command and everything it started are
    killed (124)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = 124
        out.seek(0)
        text = out.read()
    if code == 124:
        text += f"\nstopped after {timeout:.0f} s (--run-timeout or --budget)"
    return code, text


def tool(*args: str) -> None:
    code, log = run_logged([sys.executable, *args], 1800)
    if code != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed:\n{log[-4000:]}")


def synthetic_set(workdir: str, image_size: int) -> str:
    data = os.path.join(workdir, f"data{image_size}")
    if not os.path.isfile(os.path.join(data, "spm.model")):
        tool("tools/make_synthetic.py", "--out", data, "--train-samples", "2000",
             "--shard-size", "250", "--eval-per-class", "4", "--image-size", str(image_size))
        tool("tools/train_tokenizer.py", "--out", os.path.join(data, "spm"), "--vocab-size", "256",
             "--shards", os.path.join(data, "train", "shard-{000000..000007}.tar"), "--force")
    return data


def train_cmd(args, objective: str, checkpointing: bool, data: str, out: str) -> list[str]:
    return [sys.executable, "megaclip/train.py", "--deepspeed_config", args.deepspeed_config,
            "--config", "clip_vitb16", f"model.preset={args.preset}",
            f"objective.preset={objective}", f"model.grad_checkpointing={str(checkpointing).lower()}",
            f"data.train_shards={data}/train/shard-{{000000..000007}}.tar",
            f"data.tokenizer={data}/spm.model", f"data.workers={min(6, os.cpu_count() or 1)}",
            "data.shuffle_buffer=250",
            f"eval.shards={data}/eval/shard-000000.tar", f"eval.classes={data}/eval/classes.json",
            f"train.steps={args.steps}", f"train.micro_batch_size={args.micro_batch}",
            "train.grad_accum_steps=2", f"train.log_every={max(1, args.steps // 4)}",
            "train.ckpt_every=0", "train.keep_checkpoints=1", "optim.warmup_steps=3",
            f"train.output_dir={out}"]


def train_run(args, objective: str, ckpt: bool, data: str, timeout: float) -> dict:
    """One training run through megaclip/train.py, judged; its figures (``problems`` lists what
    failed)."""
    from megaclip.config import load_config
    from megaclip.reports import judge_training, read_metrics
    out = os.path.join(args.workdir, f"{objective}_ckpt{'on' if ckpt else 'off'}")
    if os.path.isdir(out):
        subprocess.run(["rm", "-rf", out], check=True)
    code, log = run_logged(train_cmd(args, objective, ckpt, data, out), timeout,
                           dict(os.environ, MEGACLIP_CHECK_COLLECTIVES="1"))
    fig = {"checkpointing": ckpt}
    if code != 0:
        rows = read_metrics(out) if os.path.isfile(os.path.join(out, "metrics.jsonl")) else []
        if rows:  # the figures it logged before it stopped
            fig["last_log"] = rows[-1]
        return {**fig, "problems": [f"exit {code}"], "log_tail": log[-4000:]}
    uses_teacher = load_config(None, [f"objective.preset={objective}"]).objective.uses_teacher
    problems, figures = judge_training(read_metrics(out), uses_teacher)
    optimiser = next((ln for ln in log.splitlines() if ln.startswith("optimiser: ")), "")
    return {**fig, **figures, "problems": problems,
            "optimiser": optimiser.removeprefix("optimiser: ").split(";")[0]}


def bench_run(args, objective: str, beside_open_clip: bool, timeout: float) -> dict:
    """One objective's step on random data (tools/bench_objectives.py), beside open_clip's own
    step in the same process when asked, with the host synchronisations of its timed steps."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "tools/bench_objectives.py", "--objectives", objective,
               "--preset", args.preset, "--batch", str(args.micro_batch), "--steps",
               str(args.bench_steps), "--warmup", "3", "--vocab", "32000" if not args.cpu else "256",
               "--deepspeed_config", args.deepspeed_config, "--grad-checkpointing",
               "--sync-debug", "--json", out] + (["--open-clip-beside-only"] if beside_open_clip
                                                 else [])
        code, log = run_logged(cmd, timeout)
        if code != 0 or not os.path.isfile(out):
            return {"problems": [f"exit {code}"], "log_tail": log[-4000:]}
        results = json.load(open(out))
    r = results[0]  # with open_clip: megaclip's steps of the step-for-step run
    fig = {k: r.get(k) for k in ("step_time_s", "samples_per_s", "tflops", "mfu", "peak_mem_gib",
                                 "optimizer")}
    fig["host_syncs"] = r.get("host_syncs", [])
    if beside_open_clip:
        fig["open_clip_step_time_s"] = r["beside_step_time_s"]
        fig["ratio_to_open_clip"] = r["ratio_to_beside"]
    return {**fig, "problems": []}


def describe(entry: dict) -> str:
    label, f = entry["run"], entry
    if entry.get("skipped"):
        return f"skip {label}: {entry['skipped']}"
    if entry.get("cut"):
        return f"cut  {label}: {entry['cut']} (the end of its log below)\n" + \
            entry.get("log_tail", "")[-1500:]
    head = f"{'FAIL' if f['problems'] else 'ok  '} {label}: "
    if "log_tail" in f:
        return head + "; ".join(f["problems"]) + "\n" + f["log_tail"]
    if f["kind"] == "train":
        mfu = f"{f['mfu']:.3f}" if f.get("mfu") is not None else "n/a"
        text = (f"{f['samples_per_s']:.1f} samples/s, {f['tflops_per_device']:.1f} model TFLOP/s, "
                f"MFU {mfu}, peak memory {f['peak_mem_gib']:.2f} GiB allocated"
                + (f" / {f['peak_reserved_gib']:.2f} GiB reserved" if "peak_reserved_gib" in f else "")
                + f", data wait {f['data_time_s'] * 1000:.0f} ms/step, loss {f['loss_first']:.3f} -> "
                f"{f['loss_last']:.3f}, {f['optimiser']}")
    else:
        mfu = f"{f['mfu']:.3f}" if f.get("mfu") is not None else "n/a"
        text = (f"step {f['step_time_s'] * 1000:.0f} ms, {f['samples_per_s']:.1f} samples/s, "
                f"{f['tflops']:.1f} model TFLOP/s, MFU {mfu}, peak memory {f['peak_mem_gib']:.2f} GiB"
                + (f"; open_clip's step {f['open_clip_step_time_s'] * 1000:.0f} ms, megaclip / "
                   f"open_clip {f['ratio_to_open_clip']:.3f}x" if "ratio_to_open_clip" in f else ""))
        from megaclip.bench.sync_watch import describe as describe_syncs
        syncs = f["host_syncs"]
        text += (f"\n     host synchronisations per timed step: "
                 f"{sum(s['per_step'] for s in syncs):.1f}\n" + describe_syncs(syncs)
                 if not args_cpu(f) else "\n     host synchronisations: not watched on the CPU")
    return head + text + f" ({f['wall_s']:.0f} s)" + "".join(f"\n     {p}" for p in f["problems"])


def args_cpu(entry: dict) -> bool:
    return entry.get("device") == "cpu"


def record(path: str, entry: dict) -> None:
    """Append one JSON line and make it durable: a check cut short keeps every finished run."""
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def plan(args) -> list[tuple[str, str, dict]]:
    """(kind, label, parameters) in the order they run: the first training run, the first bench
    run (open_clip's ratio), then alternately, so a short budget still gets both kinds."""
    objectives = [o for o in args.objectives.split(",") if o]
    benches = [o for o in args.bench.split(",") if o]
    trains = [("train", f"train {o}, checkpointing {'on' if c else 'off'}",
               {"objective": o, "ckpt": c}) for o in objectives for c in RUNS_OF[args.checkpointing]]
    bench = [("bench", f"bench {o}" + (" beside open_clip" if i == 0 else ""),
              {"objective": o, "beside_open_clip": i == 0}) for i, o in enumerate(benches)]
    out = []
    for i in range(max(len(trains), len(bench))):
        out += trains[i:i + 1] + bench[i:i + 1]
    return out


def main(argv=None) -> int:
    started = time.time()
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available() and not args.cpu:
        unseen = gpus_unseen_error(torch.version.cuda)
        if unseen:
            raise UserError(unseen)
        print("gpu_check: no GPU visible (torch.cuda.is_available() is False): nothing to check "
              "here. Run it on a machine with a CUDA GPU.", flush=True)
        return 0
    if args.steps < 4 or args.bench_steps < 1 or args.budget < 60:
        raise UserError("need --steps 4 or more, --bench-steps 1 or more and --budget 60 or more")
    os.makedirs(args.workdir, exist_ok=True)
    note = ensure_modules(MODULES, args.wheelhouse,
                          os.path.join(args.workdir, "site-py%d.%d" % sys.version_info[:2]))
    if note:
        print(f"gpu_check: {note}", flush=True)
    from megaclip.engine.metrics import peak_tflops
    from megaclip.models.presets import PRESETS
    if args.preset not in PRESETS:
        raise UserError(f"unknown --preset '{args.preset}'; presets: {', '.join(PRESETS)}")
    runs = plan(args)
    if not runs:
        raise UserError("nothing to run: --objectives and --bench are both empty")
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_tflops(torch.device("cuda"), torch.bfloat16) if torch.cuda.is_available() else None
    print(f"gpu_check on {name} (bf16 peak {peak or 'unknown'} TFLOP/s), torch "
          f"{torch.__version__}, CUDA {torch.version.cuda}; budget {args.budget} s; figures "
          f"to {args.jsonl}", flush=True)
    data = synthetic_set(args.workdir, PRESETS[args.preset]["vision"]["image_size"])
    print(f"gpu_check: synthetic set ready ({time.time() - started:.0f} s)", flush=True)
    results, failed, took = [], False, dict(FIRST_GUESS_S)  # the latest run of each kind
    for kind, label, params in runs:
        left = args.budget - (time.time() - started)
        entry = {"run": label, "kind": kind, "device": name if name == "cpu" else "cuda", **params}
        if left < min(took[kind], args.run_timeout):
            entry["skipped"] = (f"{left:.0f} s left of --budget {args.budget}, a {kind} run takes "
                                f"about {took[kind]:.0f} s")
        else:
            t0 = time.time()
            timeout = min(args.run_timeout, left)
            if kind == "train":
                entry.update(train_run(args, params["objective"], params["ckpt"], data, timeout))
            else:
                entry.update(bench_run(args, params["objective"], params["beside_open_clip"], timeout))
            entry["wall_s"] = time.time() - t0
            took[kind] = entry["wall_s"]
            if entry["problems"] == ["exit 124"] and timeout < args.run_timeout:
                # The budget, not the run's own limit, stopped it: no verdict either way.
                entry["cut"] = f"stopped at the end of --budget {args.budget} after {timeout:.0f} s"
                entry["problems"] = []
            failed |= bool(entry["problems"])
        results.append(entry)
        record(args.jsonl, {k: v for k, v in entry.items() if k != "log_tail"})
        print(describe(entry), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "peak_tflops": peak,
                       "runs": [r for r in results if not (r.get("skipped") or r.get("cut"))]},
                      f, indent=1)
    skipped = sum(1 for r in results if r.get("skipped"))
    cut = sum(1 for r in results if r.get("cut"))
    print(f"gpu_check: {'FAILED' if failed else 'all checks passed'} "
          f"({len(results) - skipped - cut} run(s), {skipped} skipped and {cut} cut for time, "
          f"{time.time() - started:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
