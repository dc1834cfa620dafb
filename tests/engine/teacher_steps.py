"""Launched by tests/engine/test_teacher.py under `deepspeed --num_gpus 2`: for each ZeRO stage
asked, a few maskclip training steps through the real engine with the EMA teacher. Alongside,
rank 0 keeps a whole-parameter fp32 EMA of the student (the reference) computed in one process
from the gathered student parameters. Rank 0 writes a JSON report per stage."""
import copy
import dataclasses
import json
import os
import sys

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from megaclip.teacher import state as teacher_state
from megaclip.config import load_config
from megaclip.data.masks import Masking, batch_masks
from megaclip.distributed import init_distributed, rank_device, setup_device, world
from megaclip.engine.ds_config import load_ds_config, merge_ds_config, model_dtype
from megaclip.engine.optim import build_optimizer, param_groups
from megaclip.engine.step import to_device, train_step
from megaclip.objectives.loss import ObjectiveLoss as Objective
from megaclip.teacher.build import build_ema_teacher
from megaclip.teacher.ema import PREFIXES, EmaTeacher
from megaclip.models import build_model, resolve_model_config
from megaclip.teacher.build import build_teacher_modules

GLOBAL_BATCH, VOCAB, MOMENTUM = 8, 128, 0.9
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "reduce", "all_to_all_single", "barrier",
               "send", "recv", "isend", "irecv", "all_gather_object", "broadcast_object_list",
               "_all_gather_base", "_reduce_scatter_base", "all_gather_coalesced",
               "all_reduce_coalesced", "gather", "scatter")


class CollectiveCounter:
    """Counts calls of every collective of torch.distributed and deepspeed.comm while active."""

    def __init__(self):
        import deepspeed.comm as dscomm
        import deepspeed.comm.comm as dscomm_impl
        import torch.distributed.distributed_c10d as c10d
        self.modules = [dist, c10d, dscomm, dscomm_impl]
        self.calls = 0

    def __enter__(self):
        self.saved = []
        for mod in self.modules:
            for name in COLLECTIVES:
                fn = getattr(mod, name, None)
                if fn is None:
                    continue
                self.saved.append((mod, name, fn))

                def counted(*a, _fn=fn, **k):
                    self.calls += 1
                    return _fn(*a, **k)
                setattr(mod, name, counted)
        return self

    def __exit__(self, *exc):
        for mod, name, fn in self.saved:
            setattr(mod, name, fn)


def ds_for_stage(base: dict, stage: int) -> dict:
    ds = copy.deepcopy(base)
    zero = ds["zero_optimization"]
    zero["stage"] = stage
    if stage < 3:
        for key in [k for k in zero if k.startswith("stage3")]:
            del zero[key]
    return ds


def student_full_fp32(engine, name: str, stage: int, bf16: bool = False) -> torch.Tensor:
    """The student's whole fp32 parameter (gathers under ZeRO-3 and from bf16's fp32 masters:
    every rank must call)."""
    p = dict(engine.module.named_parameters())[name]
    if stage == 3 or bf16:
        return deepspeed.utils.safe_get_full_fp32_param(p).detach().clone().float()
    return p.data.detach().clone().float()


def run_stage(spec: str, out_dir: str, steps: int) -> dict:
    """``spec``: a ZeRO stage, fp32 (``zero3_cpu.json`` at that stage), or ``2bf16``
    (``zero2_bf16.json``: bf16 parameters, fp32 masters in the optimiser)."""
    stage, bf16 = int(spec[0]), spec.endswith("bf16")
    rank, ws = world()
    cfg = load_config("maskclip_tiny_synthetic", [
        f"train.micro_batch_size={GLOBAL_BATCH // ws}", "optim.warmup_steps=0", "optim.lr=0.002",
        "model.vision.depth=2", "model.text.depth=2", "objective.mask_distill.prototypes=64",
        "objective.mask_distill.head_hidden=64", "objective.mask_distill.head_bottleneck=32"])
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model, VOCAB))
    base = "ds_configs/zero2_bf16.json" if bf16 else "ds_configs/zero3_cpu.json"
    ds = merge_ds_config(ds_for_stage(load_ds_config(base), stage), cfg.train, ws)
    dtype = model_dtype(ds)
    z3 = ds if stage == 3 else None
    model = build_model(cfg.model, cfg.objective, seed=0, zero3_config=z3, dtype=dtype)
    opt, _ = build_optimizer(cfg.optim, param_groups(model, cfg.optim.weight_decay), "cpu")
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    # Under ZeRO-3 the training teacher runs on its whole copy (gathered once per update).
    teacher = build_ema_teacher(engine.module, cfg.model, cfg.objective, z3, dtype, rank_device())
    objective = Objective(cfg.objective, steps)

    names = [(t_name, s_prefix + t_name[len(prefix):]) for t_name, _, _ in teacher.pairs
             for prefix, s_prefix in PREFIXES.values() if t_name.startswith(prefix)]
    reference = {}
    for t_name, s_name in names:
        full = student_full_fp32(engine, s_name, stage, bf16)
        if rank == 0:
            reference[t_name] = full

    initial = {k: v.clone() for k, v in reference.items()}
    side, ctx = cfg.model.vision.image_size, cfg.model.text.context_length
    masking = Masking(grid=side // cfg.model.vision.patch_size, image=cfg.objective.mask,
                      text=cfg.objective.text_mlm)
    update_calls, losses = 0, []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + step)
        tokens = torch.randint(4, VOCAB, (GLOBAL_BATCH, ctx), generator=g)
        eot = torch.randint(3, ctx, (GLOBAL_BATCH,), generator=g)
        batch = {"images": torch.randn(GLOBAL_BATCH, 3, side, side, generator=g),
                 "tokens": tokens, "eot": eot,
                 **batch_masks(masking, [step * 100 + i for i in range(GLOBAL_BATCH)], tokens,
                               eot, np.arange(4, VOCAB))}
        n = GLOBAL_BATCH // ws
        local = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
        terms = train_step(engine, objective, to_device(local, rank_device(), dtype),
                           teacher, step)
        losses.append({k: float(v) for k, v in terms.items()})
        objective.end_step(True)
        with CollectiveCounter() as counter:
            teacher.update(MOMENTUM)
        update_calls += counter.calls
        for t_name, s_name in names:
            full = student_full_fp32(engine, s_name, stage, bf16)
            if rank == 0:
                reference[t_name].mul_(MOMENTUM).add_(full, alpha=1 - MOMENTUM)

    # The positive control: the counter does see a collective.
    with CollectiveCounter() as control:
        deepspeed.comm.all_reduce(torch.ones(1))
        dist.all_reduce(torch.ones(1))

    tag_dir = os.path.join(out_dir, f"stage{spec}")
    os.makedirs(tag_dir, exist_ok=True)
    teacher_state.save_teacher(tag_dir, teacher, teacher_state.teacher_state(teacher))
    dist.barrier()
    # A fresh teacher restored from the files holds this rank's shards bit for bit; it gathers
    # block by block, so its equal output also checks the whole copy against that path.
    trunk2, heads2 = build_teacher_modules(cfg.model, cfg.objective, z3, dtype)
    restored = EmaTeacher(engine.module, trunk2, heads2, dtype)
    restored.ema = {k: torch.zeros_like(v) for k, v in teacher.ema.items()}
    teacher_state.load_teacher(tag_dir, restored)
    restored_exact = all(torch.equal(restored.ema[k], teacher.ema[k]) for k in teacher.ema)
    probe = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(7)).to(dtype)
    same_output = torch.equal(restored(probe)["patch_logits"], teacher(probe)["patch_logits"])
    held, full_bytes = teacher.memory_bytes()
    # The whole copy's traffic: none while it is fresh, one gather per update however many
    # forwards follow (micro-batches); the per-block path gathers at every forward.
    with CollectiveCounter() as fresh:
        teacher(probe)
        teacher(probe)
    with CollectiveCounter() as refresh:
        teacher.update(MOMENTUM)
        teacher.prefetch()
        teacher(probe)
        teacher(probe)
    with CollectiveCounter() as per_block:
        restored(probe)
    report = {"teacher_forward": teacher.describe_forward(),
              "fresh_forward_collectives": fresh.calls,
              "refresh_collectives": refresh.calls,
              "per_block_forward_collectives": per_block.calls,
              "stage": stage, "world_size": ws, "update_collectives": update_calls,
              "control_collectives": control.calls, "held_bytes": held,
              "full_bytes": full_bytes, "restored_exact": restored_exact,
              "restored_same_output": same_output, "losses": losses}
    exact = torch.tensor([float(restored_exact and same_output)])
    dist.all_reduce(exact, op=dist.ReduceOp.MIN)
    report["restored_exact_all_ranks"] = bool(exact.item() == 1.0)
    if rank == 0:
        consolidated = teacher_state.consolidate_teacher(tag_dir)
        report["max_abs_diff_vs_reference"] = max(
            (consolidated[k] - reference[k]).abs().max().item() for k in reference)
        report["max_abs_teacher_move"] = max(
            (consolidated[k] - initial[k]).abs().max().item() for k in reference)
        torch.save({"teacher": consolidated, "reference": reference},
                   os.path.join(out_dir, f"stage{spec}.pt"))
        with open(os.path.join(out_dir, f"stage{spec}.json"), "w") as f:
            json.dump(report, f)
    dist.barrier()
    return report


def run_staged(spec: str, out_dir: str, steps: int) -> dict:
    """``spec`` ``2staged``: maskclip at ZeRO-2 (fp32) whose distillation and MLM start at step
    ``steps - 1``, through the trainer's stage switch: before it the late modules (decoders,
    head, mask embedding) stay exactly as built though the optimiser steps over them; at it the
    teacher is initialised from the student's fp32 masters (fragments), equal to the student."""
    from megaclip.engine.optim import staged_param_groups
    from megaclip.engine.staging import StageSwitch
    from megaclip.objectives.stages import Stages
    stage = int(spec[0])
    rank, ws = world()
    start = steps - 1
    cfg = load_config("maskclip_tiny_synthetic", [
        f"train.micro_batch_size={GLOBAL_BATCH // ws}", "optim.warmup_steps=0", "optim.lr=0.002",
        f"train.steps={steps}", f"objective.mask_distill.start_at={start}",
        f"objective.text_mlm.start_at={start}",
        "model.vision.depth=2", "model.text.depth=2", "objective.mask_distill.prototypes=64",
        "objective.mask_distill.head_hidden=64", "objective.mask_distill.head_bottleneck=32"])
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model, VOCAB))
    ds = merge_ds_config(ds_for_stage(load_ds_config("ds_configs/zero3_cpu.json"), stage),
                         cfg.train, ws)
    dtype = model_dtype(ds)
    model = build_model(cfg.model, cfg.objective, seed=0, zero3_config=None, dtype=dtype)
    stages = Stages(cfg.objective, steps)
    groups, starts = staged_param_groups(model, cfg.optim.weight_decay, stages.later_params())
    opt, _ = build_optimizer(cfg.optim, groups, "cpu")
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    teacher = build_ema_teacher(engine.module, cfg.model, cfg.objective, None, dtype,
                                rank_device(), initialise=False)
    objective = Objective(cfg.objective, steps)
    switch = StageSwitch(stages, starts, engine.module, engine.optimizer, teacher, cfg.objective)
    late = tuple(p for ps in stages.later_params().values() for p in ps)
    initial = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    side, ctx = cfg.model.vision.image_size, cfg.model.text.context_length
    masking = Masking(grid=side // cfg.model.vision.patch_size, image=cfg.objective.mask,
                      text=cfg.objective.text_mlm)
    report = {"spec": spec, "late_groups": [g["name"] for g in groups if "@" in g["name"]]}
    for step in range(steps):
        switch.set_lr(0.002, step)
        switch.enter(step)
        if step == start:
            report["late_unchanged_before_start"] = all(
                torch.equal(p, initial[n]) for n, p in engine.module.named_parameters()
                if n.startswith(late))
            report["others_moved"] = all(
                not torch.equal(p, initial[n]) for n, p in engine.module.named_parameters()
                if not n.startswith(late) and p.dim() > 1)
            whole = teacher.whole_state_dict()  # every rank's fp32 fragments, on rank 0
            to_student = dict(PREFIXES.values())
            diffs = [(whole[k] - student_full_fp32(engine, next(
                to_student[p] + k[len(p):] for p in to_student if k.startswith(p)), stage)
                .reshape(whole[k].shape)).abs().max().item() for k in whole]
            if rank == 0:
                report["teacher_vs_student_at_start"] = max(diffs)
                report["teacher_tensors"] = len(whole)
        g = torch.Generator().manual_seed(1000 + step)
        tokens = torch.randint(4, VOCAB, (GLOBAL_BATCH, ctx), generator=g)
        eot = torch.randint(3, ctx, (GLOBAL_BATCH,), generator=g)
        batch = {"images": torch.randn(GLOBAL_BATCH, 3, side, side, generator=g),
                 "tokens": tokens, "eot": eot}
        if step >= start:
            batch.update(batch_masks(masking, [step * 100 + i for i in range(GLOBAL_BATCH)],
                                     tokens, eot, np.arange(4, VOCAB)))
        n = GLOBAL_BATCH // ws
        local = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
        terms = train_step(engine, objective, to_device(local, rank_device(), dtype),
                           teacher, step)
        report.setdefault("terms", []).append(sorted(terms))
        objective.end_step(True)
        if switch.teacher_runs(step):
            teacher.update(switch.momentum(step))
    # The late groups' Adam state began afresh at the start: 1 step since, against the others'.
    inner = engine.optimizer.optimizer
    report["adam_steps"] = [float(inner.state[engine.optimizer.single_partition_of_fp32_groups[i]]
                                  ["step"]) for i in range(len(groups))]
    if rank == 0:
        with open(os.path.join(out_dir, f"stage{spec}.json"), "w") as f:
            json.dump(report, f)
    dist.barrier()
    return report


def main(out_dir: str, steps: int, stages: list[str]) -> None:
    setup_device()  # as the trainer does: first, and with MEGACLIP_CHECK_COLLECTIVES honoured
    init_distributed()
    for stage in stages:
        (run_staged if stage.endswith("staged") else run_stage)(stage, out_dir, steps)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], int(args[1]), args[2].split(","))
