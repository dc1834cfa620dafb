#!/usr/bin/env python
"""Step time, peak memory and communication of several objectives on the same model and batch,
as ratios to the first one (and to open_clip's own step on the same architecture with
--open-clip), measured in one invocation: each in its own launch, so peak memory is its own;
with --world-size N under DeepSpeed's launcher. A figure printer, not a test.

An objective is a preset, optionally with its own overrides after '@' (repeatable):
'section.key=value' of the config, 'ds.a.b=JSON' of the DeepSpeed config, 'zero_stage=K' its ZeRO
stage. 'maskclip@objective.teacher.whole_copy_max_gib=0' runs maskclip with the per-block
teacher, 'clip@zero_stage=0' plain data parallel,
'clip@ds.zero_optimization.stage3_param_persistence_threshold=0' every parameter gathered."""
from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megaclip.errors import UserError, run_cli  # noqa: E402

EXAMPLE = """examples:
  python tools/bench_objectives.py --preset vit_b16 --batch 64 --grad-checkpointing   # one GPU, bf16
  python tools/bench_objectives.py --deepspeed_config ds_configs/zero3_cpu.json      # tiny model, CPU, fp32
  python tools/bench_objectives.py --objectives clip,silc objective.local_global.local_crops=4
  # maskclip / clip with the whole-copy teacher and the per-block one, 2 processes, collectives:
  python tools/bench_objectives.py --world-size 2 --deepspeed_config ds_configs/zero3_cpu.json \\
      --objectives clip,maskclip,maskclip@objective.teacher.whole_copy_max_gib=0
  # a staged objective stage by stage and over its run (siglip2: distillation in the last 20%):
  python tools/bench_objectives.py --deepspeed_config ds_configs/zero3_cpu.json \
      --objectives clip@objective.contrastive=siglip,siglip2
  # megaclip ZeRO-3 against open_clip's own step on the same architecture:
  python tools/bench_objectives.py --objectives clip --open-clip --batch 64 --vocab 4096 \\
      --deepspeed_config ds_configs/zero3_cpu.json model.vision.image_size=128 ...
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tools/bench_objectives.py", description=__doc__,
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", default="clip,maskclip,maskclip_flip,silc,maskclip+silc",
                   help="objective presets (each optionally PRESET@key=value@...), comma "
                        "separated; ratios are to the first")
    p.add_argument("--preset", default="tiny", help="model preset (tiny, vit_b16, vit_l14)")
    p.add_argument("--batch", type=int, default=32, help="micro-batch per process")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--world-size", type=int, default=1,
                   help="processes per objective, under DeepSpeed's launcher (default 1)")
    p.add_argument("--open-clip", action="store_true",
                   help="also time open_clip's own CLIP step on the same architecture and batch "
                        "(fp32 on the CPU, bf16 autocast on a GPU; at one process step for "
                        "step beside the first objective) and print ratios to it")
    p.add_argument("--deepspeed_config", default=os.path.join(ROOT, "ds_configs", "zero3_bf16.json"),
                   help="DeepSpeed JSON (default: ds_configs/zero3_bf16.json, which needs a GPU; "
                        "on the CPU pass ds_configs/zero3_cpu.json)")
    p.add_argument("--open-clip-beside-only", action="store_true",
                   help="time the first objective only step for step beside open_clip's step "
                        "(one process, not also alone first)")
    p.add_argument("--sync-debug", action="store_true",
                   help="on a GPU, list the host synchronisations of the timed steps by source "
                        "line (torch.cuda.set_sync_debug_mode('warn'))")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides applied to every objective (after the flags above)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def overrides(args) -> list[str]:
    return [f"model.preset={args.preset}", f"train.micro_batch_size={args.batch}",
            f"model.grad_checkpointing={str(args.grad_checkpointing).lower()}", *args.overrides]


INTERLEAVED = "beside open_clip: "


def split_variant(name: str) -> tuple[str, list[str], list[str]]:
    """'preset@k=v@ds.a.b=1@zero_stage=2' -> (preset, ['k=v'], ['ds.a.b=1', 'zero_stage=2'])."""
    preset, *extra = name.split("@")
    ds_items = [e for e in extra if e.startswith(("ds.", "zero_stage="))]
    for item in ds_items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"'{name}': '{item}' is not key=value")
        if key == "zero_stage" and value not in ("0", "1", "2", "3"):
            raise UserError(f"'{name}': zero_stage must be 0-3")
    return preset, [e for e in extra if e not in ds_items], ds_items


def with_ds_items(ds: dict, items: list[str]) -> dict:
    """The DeepSpeed config with a variant's changes (values as JSON, else strings)."""
    ds = copy.deepcopy(ds)
    for item in items:
        key, _, value = item.partition("=")
        if key == "zero_stage":
            zero = ds.setdefault("zero_optimization", {})
            zero["stage"] = int(value)
            for k in [k for k in zero if k.startswith("stage3")] if int(value) < 3 else []:
                del zero[k]
            if int(value) == 0:  # without ZeRO DeepSpeed accumulates in the model's dtype only
                ds.get("data_types", {}).pop("grad_accum_dtype", None)
            continue
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        *path, last = key.split(".")[1:]
        node = ds
        for part in path:
            node = node.setdefault(part, {})
        node[last] = parsed
    return ds


def run_child(args) -> int:
    import dataclasses

    from megaclip.config import load_config
    from megaclip.models import resolve_model_config
    cfg = load_config(None, overrides(args))
    model = dataclasses.replace(resolve_model_config(cfg.model, args.vocab))
    if args.child == "open_clip":
        from megaclip.bench.open_clip_step import measure_open_clip
        result = measure_open_clip(model, args.batch, args.steps, args.warmup, cfg.optim.lr,
                                   cfg.optim.weight_decay)
    else:
        from megaclip.distributed import rank
        from megaclip.bench.open_clip_step import OpenClipStepper
        from megaclip.bench.objectives import measure
        from megaclip.engine.ds_config import load_ds_config
        name, beside = args.child, None
        if name.startswith(INTERLEAVED):  # step for step with open_clip, in this process
            name = name[len(INTERLEAVED):]
            beside = lambda: OpenClipStepper(model, args.batch, cfg.optim.lr,  # noqa: E731
                                             cfg.optim.weight_decay)
        preset, extra, ds_items = split_variant(name)
        result = measure(preset, overrides(args) + extra,
                         with_ds_items(load_ds_config(args.deepspeed_config), ds_items),
                         args.vocab, args.steps, args.warmup, beside, args.sync_debug)
        result["objective"] = args.child
        if rank() != 0:
            return 0
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, argv: list[str], name: str) -> dict:
    script = [os.path.abspath(__file__), *argv, "--child", name,
              "--deepspeed_config", args.deepspeed_config]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    if args.world_size > 1 and name != "open_clip":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus",
               str(args.world_size), "--master_port", str(free_port()), *script]
    else:
        cmd = [sys.executable, *script]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        if proc.returncode == 2 and proc.stderr.strip():  # the child's user error, as is
            raise UserError(proc.stderr.strip().splitlines()[-1].removeprefix("error: "))
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def describe_stages(r: dict) -> str:
    """A staged objective (terms with start_at): each stage's step time and model FLOPs, and
    the run's, weighted by each stage's share of train.steps."""
    lines = [f"{'':>16}stage from step {s['first_step']} ({s['steps_share']:.0%} of the run): "
             f"{s['step_time_s'] * 1000:.1f} ms/step, {s['flops_per_sample'] / 1e9:.3g} model "
             f"GFLOPs per sample" for s in r["stages"]]
    lines.append(f"{'':>16}over the run: {r['step_time_s'] * 1000:.1f} ms/step, "
                 f"{r['flops_per_sample'] / 1e9:.3g} GFLOPs per sample (the last stage's "
                 f"{r['stages'][-1]['flops_per_sample'] / 1e9:.3g}); memory and collectives "
                 f"below are the last stage's")
    return "\n".join(lines)


def describe(r: dict) -> str:
    if "stages" in r:
        return describe_stages(r) + "\n" + describe({k: v for k, v in r.items()
                                                     if k != "stages"})
    if r["objective"].startswith(INTERLEAVED):
        name = r["objective"][len(INTERLEAVED):]
        return (f"{name} and open_clip, step for step in one process: "
                f"{r['step_time_s'] * 1000:.1f} and {r['beside_step_time_s'] * 1000:.1f} ms/step "
                f"(medians of {r['batch']}-sample steps)")
    if r["objective"] == "open_clip":
        return (f"{'open_clip':>14}: {r['step_time_s'] * 1000:9.1f} ms/step  "
                f"{r['samples_per_s']:8.1f} samples/s  ({r['params_m']:.1f}M params, "
                f"{r['device']}, batch {r['batch']}, 1 process, {r['optimizer']})")
    mfu = f"  MFU {r['mfu']:.3f}" if r["mfu"] is not None else ""
    reserved = f" (reserved {r['peak_reserved_gib']:.2f})" if "peak_reserved_gib" in r else ""
    comm = r["comm"]
    teacher = (f"\n{'':>16}EMA update {r['teacher_update_s'] * 1000:.1f} ms/step "
               f"({r['teacher_update_s'] / r['step_time_s']:.1%} of the step); teacher forward: "
               f"{r['teacher_forward']}" if r["teacher_forward"] else "")
    return (f"{r['objective']:>14}: {r['step_time_s'] * 1000:9.1f} ms/step (min "
            f"{r['step_time_min_s'] * 1000:.1f})  {r['samples_per_s']:8.1f} samples/s  "
            f"{r['tflops']:7.3f} model TFLOP/s{mfu}  peak {r['peak_mem_gib']:6.2f} GiB{reserved}  "
            f"({r['params_m']:.1f}M params, {r['device']}, batch {r['batch']} x "
            f"{r['world_size']} process(es), ZeRO {r['zero_stage']}, {r['optimizer']})\n"
            f"{'':>16}ZeRO-3 module hooks per step: {comm.get('zero3_hooks', 0):.0f}; "
            f"collectives per step: {comm['collectives']:.1f} calls, "
            f"{comm['bytes'] / 2**20:.2f} MiB ("
            + ", ".join(f"{k} {v['calls']:g}" for k, v in comm["by_name"].items()) + ")"
            + teacher)


def main(argv=None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    names = [n for n in args.objectives.split(",") if n]
    if not names:
        raise UserError("--objectives is empty")
    if args.world_size < 1:
        raise UserError("--world-size must be >= 1")
    for name in names:
        split_variant(name)
    if args.open_clip_beside_only:
        if args.world_size != 1:
            raise UserError("--open-clip-beside-only runs one process: --world-size 1")
        args.open_clip = True
        names[0] = INTERLEAVED + names[0]  # not also alone: one process fewer
    elif args.open_clip:  # in one process: step for step beside the first objective
        names.append(INTERLEAVED + names[0] if args.world_size == 1 else "open_clip")
    results = []
    for name in names:
        results.append(launch(args, argv, name))
        print(describe(results[-1]), flush=True)
        if "host_syncs" in results[-1]:
            from megaclip.bench.sync_watch import describe as describe_syncs
            print(f"host synchronisations in {results[-1]['objective']}'s timed steps:\n"
                  + describe_syncs(results[-1]["host_syncs"]), flush=True)
    ours = [r for r in results if r["objective"] != "open_clip"
            and not r["objective"].startswith(INTERLEAVED)]
    base = ours[0] if ours else results[0]
    for r in ours[1:]:
        print(f"{r['objective']} / {base['objective']}: time "
              f"{r['step_time_s'] / base['step_time_s']:.2f}x, peak memory "
              f"{r['peak_mem_gib'] / base['peak_mem_gib']:.2f}x "
              f"({r['peak_mem_gib']:.2f} vs {base['peak_mem_gib']:.2f} GiB), model FLOPs "
              f"{r['flops_per_sample'] / base['flops_per_sample']:.2f}x, collectives "
              f"{r['comm']['collectives']:.0f} vs {base['comm']['collectives']:.0f} per step, "
              f"ZeRO-3 hooks {r['comm'].get('zero3_hooks', 0):.0f} vs "
              f"{base['comm'].get('zero3_hooks', 0):.0f}")
    if args.open_clip:
        oc = next(r for r in reversed(results) if r["objective"] == "open_clip"
                  or r["objective"].startswith(INTERLEAVED))
        if oc["objective"] == "open_clip":
            for r in ours:
                print(f"{r['objective']} / open_clip: time "
                      f"{r['step_time_s'] / oc['step_time_s']:.3f}x (medians, separate "
                      f"processes; {r['world_size']} process(es) against 1)")
        else:
            print(f"{oc['objective'][len(INTERLEAVED):]} / open_clip: time "
                  f"{oc['ratio_to_beside']:.3f}x (median of the step-for-step ratios)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    run_cli(main)
