"""Step time and peak memory of one objective on a given model and batch, on random data, through
the same engine, teacher and objective as training (one process)."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from megaclip.config import load_config
from megaclip.data.masks import Masking, batch_masks
from megaclip.distributed import default_env, init_distributed, setup_device
from megaclip.engine.ds_config import check_precision, merge_ds_config, model_dtype, zero_stage
from megaclip.engine.flops import train_flops_per_sample
from megaclip.engine.metrics import memory_figures, peak_tflops
from megaclip.engine.optim import build_optimizer, param_groups
from megaclip.engine.step import Objective, to_device, train_step
from megaclip.engine.teacher import EmaTeacher
from megaclip.models import build_model, resolve_model_config
from megaclip.models.registry import build_teacher_modules, check_multicrop


def measure(objective_preset: str, overrides: list[str], ds_config: dict, vocab_size: int,
            steps: int, warmup: int) -> dict:
    import deepspeed
    cfg = load_config(None, [f"objective.preset={objective_preset}", *overrides])
    default_env()
    device = setup_device()
    check_precision(ds_config, device)
    init_distributed()
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model, vocab_size))
    check_multicrop(cfg.model, cfg.objective)
    ds = merge_ds_config(ds_config, cfg.train, 1)
    dtype, stage = model_dtype(ds), zero_stage(ds)
    model = build_model(cfg.model, cfg.objective, 0, ds if stage == 3 else None, dtype)
    opt, opt_name = build_optimizer(cfg.optim, param_groups(model, cfg.optim.weight_decay), device.type)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    teacher = None
    if cfg.objective.uses_teacher:
        trunk, heads = build_teacher_modules(cfg.model, cfg.objective, ds if stage == 3 else None,
                                             dtype)
        teacher = EmaTeacher(engine.module, trunk.to(device),
                             {k: h.to(device) for k, h in heads.items()}, dtype)
        teacher.init_from_student()
    objective = Objective(cfg.objective, steps + warmup).to(device)
    v, t, B = cfg.model.vision, cfg.model.text, cfg.train.micro_batch_size
    obj = cfg.objective
    masking = Masking(grid=v.image_size // v.patch_size,
                      image=obj.mask if obj.uses_masks else None,
                      text=obj.text_mlm if obj.text_mlm.weight > 0 else None)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, vocab_size, (B, t.context_length), generator=g)
    eot = torch.full((B,), t.context_length * 3 // 4)
    batch = {"images": torch.randn(B, 3, v.image_size, v.image_size, generator=g),
             "tokens": tokens, "eot": eot,
             **batch_masks(masking, list(range(B)), tokens, eot, np.arange(4, vocab_size))}
    if obj.uses_multicrop:  # SILC's views, random like the rest
        lg = obj.local_global
        batch["views"] = torch.randn(B, lg.global_crops - 1, 3, v.image_size, v.image_size,
                                     generator=g)
        batch["local_views"] = torch.randn(B, lg.local_crops, 3, lg.local_size, lg.local_size,
                                           generator=g)
    batch = to_device(batch, device, dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(warmup):
        train_step(engine, objective, batch, teacher, i)
        objective.end_step(True)
        if teacher is not None:
            teacher.update(0.996)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        train_step(engine, objective, batch, teacher, warmup + i)
        objective.end_step(True)
        if teacher is not None:
            teacher.update(0.996)
    sync()
    step_time = (time.perf_counter() - start) / steps
    flops = train_flops_per_sample(cfg.model, cfg.objective)
    peak = peak_tflops(device, dtype)
    tflops = B * flops / step_time / 1e12
    return {"objective": objective_preset, "device": device.type, "batch": B,
            "step_time_s": step_time, "samples_per_s": B / step_time, "tflops": tflops,
            "mfu": tflops / peak if peak else None, "flops_per_sample": flops,
            "optimizer": opt_name, **memory_figures(device),
            "params_m": sum(getattr(p, "ds_numel", p.numel())
                            for p in engine.module.parameters()) / 1e6}
