"""Step time, peak memory and communication of one objective on a given model and batch, on
random data, through the same engine, teacher and objective as training. Runs in every process
of a launch (``deepspeed --num_gpus N`` or one process); rank 0 reports. An objective whose
terms start late (``start_at``) is measured stage by stage, as training runs each stage, and
its run figures are the stages' weighted by their share of ``train.steps``."""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Optional

import numpy as np
import torch

from megaclip.bench.comm_stats import CollectiveStats
from megaclip.bench.sync_watch import SyncWatch
from megaclip.config import load_config
from megaclip.data.masks import batch_masks, masking_for
from megaclip.engine.assembly import build_training, resolve_config, start_process
from megaclip.engine.metrics import memory_figures, peak_tflops
from megaclip.engine.staging import StageSwitch
from megaclip.engine.step import to_device, train_step
from megaclip.objectives.flops import train_flops_per_sample
from megaclip.objectives.stages import Stages


def random_batch(cfg, vocab_size: int, seed: int) -> dict:
    """A micro-batch of random images and captions, with what the objective's views and masks
    need, drawn from ``seed``."""
    v, t, B = cfg.model.vision, cfg.model.text, cfg.train.micro_batch_size
    obj = cfg.objective
    masking = masking_for(v.image_size, v.patch_size, obj)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, vocab_size, (B, t.context_length), generator=g)
    eot = torch.full((B,), t.context_length * 3 // 4)
    batch = {"images": torch.randn(B, 3, v.image_size, v.image_size, generator=g),
             "tokens": tokens, "eot": eot,
             **(batch_masks(masking, [seed * B + i for i in range(B)], tokens, eot,
                            np.arange(4, vocab_size)) if masking is not None else {})}
    if obj.uses_multicrop:  # SILC's views, random like the rest
        lg = obj.local_global
        batch["views"] = torch.randn(B, lg.global_crops - 1, 3, v.image_size, v.image_size,
                                     generator=g)
        batch["local_views"] = torch.randn(B, lg.local_crops, 3, lg.local_size, lg.local_size,
                                           generator=g)
    return batch


class ObjectiveStepper:
    """One objective's engine, teacher, objective and random micro-batch, stepped one timed
    optimiser step at a time (accumulation 1); every process of the launch builds one."""

    def __init__(self, objective_preset: str, overrides: list[str], ds_config: dict,
                 vocab_size: int, total_steps: int, stats: Optional[CollectiveStats] = None):
        cfg = load_config(None, [f"objective.preset={objective_preset}", *overrides])
        # No stop-signal handlers; the collective counters go in before DeepSpeed's backend
        # looks its functions up.
        process = start_process(ds_config, before_init=stats.install if stats else None,
                                slurm=False)
        device = self.device = process.device
        self.world_size = process.world_size
        cfg = resolve_config(cfg, vocab_size)
        # A staged objective keeps the run's train.steps: its stages start at steps of it.
        steps = (cfg.train.steps if Stages(cfg.objective, cfg.train.steps).staged
                 else total_steps)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, seed=0))
        training = build_training(cfg, ds_config, self.world_size, device)
        self.dtype, self.stage = training.dtype, training.stage
        self.engine, self.teacher = training.engine, training.teacher
        self.objective, self.optimizer = training.objective, training.optimizer_name
        self.stages = training.stages
        self.switch = StageSwitch(training.stages, training.group_starts, self.engine.module,
                                  training.optimizer, self.teacher, cfg.objective)
        self.num_params = training.num_params()
        self.cfg, self.vocab_size, self.rank = cfg, vocab_size, process.rank
        self.enter(0)

    def enter(self, first_step: int) -> None:
        """Step from ``first_step`` on as training does: that stage's passes, views and masks,
        the teacher initialised once a term that reads it has started."""
        self.steps_done = self.first_step = first_step
        later = [b for b in self.stages.boundaries if b > first_step]
        self.last_step = later[0] - 1 if later else None  # steps_done stays in the stage
        self.stage_cfg = dataclasses.replace(self.cfg, objective=self.stages.at(first_step))
        self.switch.set_lr(self.cfg.optim.lr, first_step)
        self.switch.enter(first_step)
        self.batch = to_device(random_batch(self.stage_cfg, self.vocab_size, self.rank),
                               self.device, self.dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, watch=contextlib.nullcontext) -> tuple[float, float]:
        """(seconds of the whole step, seconds of its EMA update and gather start). ``watch``:
        a context around the step's own work (not the timing's synchronisations)."""
        self.sync()
        start = time.perf_counter()
        with watch():
            train_step(self.engine, self.objective, self.batch, self.teacher, self.steps_done)
            self.objective.end_step(True)
        update = 0.0
        if self.switch.teacher_runs(self.steps_done):
            self.sync()
            t0 = time.perf_counter()
            with watch():
                self.teacher.update(0.996)
            self.sync()
            update = time.perf_counter() - t0
            with watch():
                self.teacher.prefetch()  # its gather is the step's, not the update's
        self.sync()
        self.steps_done += 1
        if self.last_step is not None:
            self.steps_done = min(self.steps_done, self.last_step)
        return time.perf_counter() - start, update

    def finish(self) -> None:
        if self.teacher is not None:
            self.teacher.settle()

    def figures(self, times: list[float], update_times: list[float],
                stats: Optional[CollectiveStats]) -> dict:
        cfg, device = self.stage_cfg, self.device
        step_time = statistics.median(times)
        flops = train_flops_per_sample(cfg.model, cfg.objective)
        peak = peak_tflops(device, self.dtype)
        B = cfg.train.micro_batch_size
        tflops = B * flops / step_time / 1e12
        teacher = self.teacher if self.switch.teacher_runs(self.first_step) else None
        return {"objective": cfg.objective.preset, "first_step": self.first_step,
                "device": device.type, "batch": B,
                "world_size": self.world_size, "zero_stage": self.stage,
                "step_time_s": step_time, "step_time_min_s": min(times),
                "samples_per_s": B * self.world_size / step_time, "tflops": tflops,
                "mfu": tflops / peak if peak else None, "flops_per_sample": flops,
                "teacher_update_s": statistics.median(update_times) if teacher else 0.0,
                "teacher_forward": teacher.describe_forward() if teacher else None,
                "comm": stats.summary(per=len(times)) if stats else None,
                "optimizer": self.optimizer, **memory_figures(device),
                "params_m": self.num_params / 1e6}


def measure(objective_preset: str, overrides: list[str], ds_config: dict, vocab_size: int,
            steps: int, warmup: int, beside=None, sync_debug: bool = False) -> dict:
    """Figures of ``steps`` optimiser steps after ``warmup`` untimed ones. ``step_time_s`` is the
    median step (robust to a busy machine), ``step_time_min_s`` the fastest; ``comm`` the
    collectives and bytes per step; ``teacher_update_s`` the EMA update's time per step.
    ``beside``: a callable building another stepper (``step() -> seconds``, e.g. open_clip's)
    run in this process alternately with this one, step for step, so that both see the same
    machine; its median step is ``beside_step_time_s`` and the median of the per-pair ratios
    ``ratio_to_beside``. ``sync_debug``: ``host_syncs`` lists the host synchronisations of the
    timed steps by source line (``SyncWatch``; a GPU only)."""
    stats = CollectiveStats()
    stepper = ObjectiveStepper(objective_preset, overrides, ds_config, vocab_size,
                               steps + warmup, stats)
    other = beside() if beside is not None else None
    watch = SyncWatch(sync_debug)
    per_stage = []
    for first in [0, *stepper.stages.boundaries]:  # one stage unless terms start late
        if first:
            stepper.enter(first)
        times, update_times, other_times = [], [], []
        stats.start()
        for i in range(warmup + steps):
            timed = i >= warmup
            if i == warmup:
                stepper.sync()
                if stepper.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
            stats.counting = timed  # this objective's timed steps only
            took, update = stepper.step(watch.watch if timed else contextlib.nullcontext)
            stats.counting = False
            other_took = other.step() if other is not None else None
            if timed:
                times.append(took)
                update_times.append(update)
                if other is not None:
                    other_times.append(other_took)
        out = stepper.figures(times, update_times, stats)
        if other is not None:
            out["beside_step_time_s"] = statistics.median(other_times)
            out["ratio_to_beside"] = statistics.median(a / b for a, b in zip(times, other_times))
        per_stage.append(out)
    stepper.finish()
    out = over_the_run(per_stage, stepper.stages) if len(per_stage) > 1 else per_stage[0]
    if watch.enabled:
        out["host_syncs"] = watch.summary(len(per_stage) * steps)
    return out


def over_the_run(per_stage: list[dict], stages) -> dict:
    """A staged objective's figures over its run: the last stage's (every term; its memory and
    communication), with ``step_time_s`` and ``flops_per_sample`` the stages' weighted by
    their share of the run's steps (``steps_share``), and each stage's own under ``stages``."""
    total = stages.total_steps
    for r, (a, b, _) in zip(per_stage, stages.segments(0, total)):
        r["last_step"], r["steps_share"] = b, (b - a) / total
    out = dict(per_stage[-1])
    for key in ("step_time_s", "flops_per_sample"):
        out[key] = sum(r["steps_share"] * r[key] for r in per_stage)
    out["samples_per_s"] = out["batch"] * out["world_size"] / out["step_time_s"]
    out["tflops"] = out["batch"] * out["flops_per_sample"] / out["step_time_s"] / 1e12
    if out["mfu"] is not None:
        out["mfu"] = out["tflops"] * per_stage[-1]["mfu"] / per_stage[-1]["tflops"]
    out["stages"] = per_stage
    return out
