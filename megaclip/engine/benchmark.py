"""Step time, peak memory and communication of one objective on a given model and batch, on
random data, through the same engine, teacher and objective as training. Runs in every process
of a launch (``deepspeed --num_gpus N`` or one process); rank 0 reports."""
from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np
import torch

from megaclip.comm_stats import CollectiveStats
from megaclip.config import load_config
from megaclip.data.masks import Masking, batch_masks
from megaclip.distributed import default_env, init_distributed, setup_device, world
from megaclip.engine.ds_config import check_precision, merge_ds_config, model_dtype, zero_stage
from megaclip.engine.flops import train_flops_per_sample
from megaclip.engine.metrics import memory_figures, peak_tflops
from megaclip.engine.optim import build_optimizer, param_groups
from megaclip.engine.step import Objective, to_device, train_step
from megaclip.engine.teacher import build_ema_teacher
from megaclip.models import build_model, resolve_model_config
from megaclip.models.registry import check_multicrop


def random_batch(cfg, vocab_size: int, seed: int) -> dict:
    """A micro-batch of random images and captions, with what the objective's views and masks
    need, drawn from ``seed``."""
    v, t, B = cfg.model.vision, cfg.model.text, cfg.train.micro_batch_size
    obj = cfg.objective
    masking = Masking(grid=v.image_size // v.patch_size,
                      image=obj.mask if obj.uses_masks else None,
                      text=obj.text_mlm if obj.text_mlm.weight > 0 else None)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, vocab_size, (B, t.context_length), generator=g)
    eot = torch.full((B,), t.context_length * 3 // 4)
    batch = {"images": torch.randn(B, 3, v.image_size, v.image_size, generator=g),
             "tokens": tokens, "eot": eot,
             **batch_masks(masking, [seed * B + i for i in range(B)], tokens, eot,
                           np.arange(4, vocab_size))}
    if obj.uses_multicrop:  # SILC's views, random like the rest
        lg = obj.local_global
        batch["views"] = torch.randn(B, lg.global_crops - 1, 3, v.image_size, v.image_size,
                                     generator=g)
        batch["local_views"] = torch.randn(B, lg.local_crops, 3, lg.local_size, lg.local_size,
                                           generator=g)
    return batch


def measure(objective_preset: str, overrides: list[str], ds_config: dict, vocab_size: int,
            steps: int, warmup: int) -> dict:
    """Figures of ``steps`` optimiser steps after ``warmup`` untimed ones (accumulation 1).
    ``step_time_s`` is the median step (robust to a busy machine), ``step_time_min_s`` the
    fastest; ``comm`` the collectives and bytes per step; ``teacher_update_s`` the EMA update's
    time per step (the update and the start of the teacher's gather)."""
    import deepspeed
    cfg = load_config(None, [f"objective.preset={objective_preset}", *overrides])
    default_env()
    device = setup_device()
    check_precision(ds_config, device)
    stats = CollectiveStats().install()  # before DeepSpeed's backend looks its functions up
    init_distributed()
    rank, ws = world()
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model, vocab_size))
    check_multicrop(cfg.model, cfg.objective)
    ds = merge_ds_config(ds_config, cfg.train, ws)
    dtype, stage = model_dtype(ds), zero_stage(ds)
    z3 = ds if stage == 3 else None
    model = build_model(cfg.model, cfg.objective, 0, z3, dtype)
    opt, opt_name = build_optimizer(cfg.optim, param_groups(model, cfg.optim.weight_decay),
                                    device.type)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    teacher = (build_ema_teacher(engine.module, cfg.model, cfg.objective, z3, dtype, device)
               if cfg.objective.uses_teacher else None)
    objective = Objective(cfg.objective, steps + warmup).to(device)
    batch = to_device(random_batch(cfg, vocab_size, rank), device, dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, update_times = [], []
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            stats.start()
        start = time.perf_counter()
        train_step(engine, objective, batch, teacher, i)
        objective.end_step(True)
        if teacher is not None:
            sync()
            t0 = time.perf_counter()
            teacher.update(0.996)
            teacher.prefetch()
            sync()
            update_times.append(time.perf_counter() - t0)
        sync()
        times.append(time.perf_counter() - start)
    stats.stop()
    if teacher is not None:
        teacher.settle()
    times, update_times = times[warmup:], update_times[warmup:]
    step_time = statistics.median(times)
    flops = train_flops_per_sample(cfg.model, cfg.objective)
    peak = peak_tflops(device, dtype)
    B = cfg.train.micro_batch_size
    tflops = B * flops / step_time / 1e12
    return {"objective": objective_preset, "device": device.type, "batch": B, "world_size": ws,
            "zero_stage": stage, "step_time_s": step_time, "step_time_min_s": min(times),
            "samples_per_s": B * ws / step_time, "tflops": tflops,
            "mfu": tflops / peak if peak else None, "flops_per_sample": flops,
            "teacher_update_s": statistics.median(update_times) if update_times else 0.0,
            "teacher_forward": teacher.describe_forward() if teacher is not None else None,
            "comm": stats.summary(per=steps),
            "optimizer": opt_name, **memory_figures(device),
            "params_m": sum(getattr(p, "ds_numel", p.numel())
                            for p in engine.module.parameters()) / 1e6}
