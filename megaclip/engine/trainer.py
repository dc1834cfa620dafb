"""The training loop: setup in a documented order, then steps, logs, evals and checkpoints."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

import deepspeed
import torch

from megaclip import checkpoint, checkpoint_folder, cluster
from megaclip.config import Config, save_resolved, to_dict
from megaclip.data.sequence import FIRST_BAD_NAMED
from megaclip.data.webdataset import SKIP_KINDS, bad_shards_over_limit, build_train_loader
from megaclip.data.eval_set import EvalSet
from megaclip.data.masks import Masking
from megaclip.data.tokenizer import Tokenizer
from megaclip.data.shards import shard_list
from megaclip.distributed import (all_reduce_sum, default_env, init_distributed,
                                  on_rank0, setup_device, world)
from megaclip.engine.ds_config import check_precision, merge_ds_config, model_dtype, zero_stage
from megaclip.engine.flops import train_flops_per_sample
from megaclip.engine.guard import StepGuard, nan_injections, reduce_step_flags
from megaclip.engine.metrics import MetricLogger, memory_figures, peak_tflops
from megaclip.engine.optim import build_optimizer, param_groups
from megaclip.engine.schedules import warmup_cosine
from megaclip.engine.step import Objective, to_device, train_step
from megaclip.engine.teacher import build_ema_teacher, momentum_at
from megaclip.errors import UserError
from megaclip.evaluation import evaluate
from megaclip.pictures import similarity_maps, training_samples
from megaclip.probes import run_probes
from megaclip.models import build_model, resolve_model_config
from megaclip.data.views import MultiCrop
from megaclip.models.registry import check_multicrop, context_length


def resolve(cfg: Config, tokenizer: Tokenizer) -> Config:
    """Fill what the experiment file leaves to the preset and the tokenizer."""
    model = resolve_model_config(cfg.model, tokenizer.vocab_size)
    if model.text.context_length != tokenizer.context_length:
        raise AssertionError("tokenizer built with another context length")
    check_multicrop(model, cfg.objective)
    return dataclasses.replace(cfg, model=model)


def pack_for_reduce(means: dict[str, torch.Tensor], counts: list[float],
                    device: torch.device) -> torch.Tensor:
    """One vector on ``device`` for a single all-reduce: ``means`` in sorted key order, then
    ``counts`` (host numbers, copied to the device in one transfer)."""
    vec = [means[k].detach().float().reshape(1) for k in sorted(means)]
    vec.append(torch.tensor(counts, dtype=torch.float32).to(device))
    return torch.cat(vec)


def unpack_reduced(summed: list[float], keys: list[str], world_size: int
                   ) -> tuple[dict[str, float], list[float]]:
    """Inverse of ``pack_for_reduce`` after the sum over ranks: means of ``keys``, counts."""
    values = {k: summed[i] / world_size for i, k in enumerate(keys)}
    return values, summed[len(keys):]


class Trainer:
    """Order: the rank's device -> distributed -> tokenizer/config -> DeepSpeed config ->
    model (zero.Init) -> optimiser -> engine -> EMA teacher -> resume -> data."""

    def __init__(self, cfg: Config, ds_config: dict, resume: Optional[str] = None,
                 ds_source: str = "DeepSpeed config", stop_after: int = 0):
        from_slurm = cluster.setup_from_slurm()  # an srun task: env:// from Slurm's variables
        default_env()
        # cuda:LOCAL_RANK, selected before any model, tensor, process group or data worker.
        self.device = setup_device(slurm_task=from_slurm)
        check_precision(ds_config, self.device, ds_source)
        # Before the data workers fork, so they inherit the handler instead of dying of it.
        self.stop_signal = cluster.StopSignal(tuple(cfg.train.stop_signals))
        init_distributed()
        self.stop_after = stop_after
        self.rank, self.world_size = world()
        # Checked by rank 0 alone and shared: fail fast, before any rank builds a model.
        urls = shard_list(cfg.data.train_shards)
        self.from_slurm = from_slurm
        torch.manual_seed(cfg.train.seed)

        self.tokenizer = Tokenizer(cfg.data.tokenizer, context_length(cfg.model))
        self.cfg = cfg = resolve(cfg, self.tokenizer)
        self.ds_config = merge_ds_config(ds_config, cfg.train, self.world_size, ds_source)
        self.dtype = model_dtype(self.ds_config)
        stage = zero_stage(self.ds_config)

        model = build_model(cfg.model, cfg.objective, cfg.train.seed,
                            self.ds_config if stage == 3 else None, self.dtype)
        optimizer, optimizer_name = build_optimizer(
            cfg.optim, param_groups(model, cfg.optim.weight_decay), self.device.type)
        self.optimizer_kind = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config)
        self.objective = Objective(cfg.objective, cfg.train.steps).to(self.device)
        self.teacher = None
        if cfg.objective.uses_teacher:
            self.teacher = build_ema_teacher(self.engine.module, cfg.model, cfg.objective,
                                             self.ds_config if stage == 3 else None, self.dtype,
                                             self.device)

        self.out_dir = cfg.train.output_dir
        self.ckpt_root = os.path.abspath(os.path.join(self.out_dir, "checkpoints"))
        self.step, self.samples_seen = 0, 0
        self.guard = StepGuard(cfg.train.max_skipped_steps_in_a_row)
        self.inject_nan = nan_injections()  # test hook: empty unless MEGACLIP_INJECT_NAN is set
        data_state, notes = None, []
        # The folder locked to this run; what interrupted writes left behind finished or
        # removed, never resumed from as is.
        notes += on_rank0(checkpoint_folder.prepare_output, self.ckpt_root, resume)
        resume_dir = checkpoint.choose_resume(self.ckpt_root, resume)
        if resume_dir is not None:
            checkpoint.check_optimizer(resume_dir, self.optimizer_kind)
            client = checkpoint.load(self.engine, resume_dir, self.ckpt_root)
            self.step, self.samples_seen = client["step"], client["samples_seen"]
            self.guard = StepGuard.from_state(cfg.train.max_skipped_steps_in_a_row, client)
            self.objective.load_state_dict(client.get("objective", {}))
            if self.teacher is not None:
                checkpoint.load_teacher(resume_dir, self.teacher)
            if "rng" in client:
                checkpoint.set_rng_state(client["rng"])
            data_state = client["data"]
            # Newer checkpoints of this run: kept, out of the way.
            notes += [f"moved {p} aside: resuming from the older {resume_dir}"
                      for p in on_rank0(checkpoint_folder.move_aside, self.ckpt_root, self.step)]
        self.loader = build_train_loader(
            cfg.data, cfg.model.vision.image_size, self.tokenizer, cfg.train.micro_batch_size,
            self.rank, self.world_size, data_state, restart_seed=self.step,
            masking=self._masking(), urls=urls, stop_signals=tuple(cfg.train.stop_signals),
            multicrop=(MultiCrop(cfg.model.vision.image_size, cfg.objective.local_global,
                                 cfg.data.crop_ratio)
                       if cfg.objective.uses_multicrop else None),
            pin_memory=self.device.type == "cuda")

        self.eval_set = (EvalSet(cfg.eval.shards, cfg.eval.classes, cfg.model.vision.image_size,
                                 cfg.data.mean, cfg.data.std, cfg.data.image_keys,
                                 cfg.data.caption_key) if cfg.eval.shards else None)
        self.log = MetricLogger(os.path.join(self.out_dir, "tensorboard") if cfg.train.tensorboard
                                else None, self.rank == 0, cfg.train.steps,
                                os.path.join(self.out_dir, "metrics.jsonl"))
        if self.rank == 0:
            save_resolved(cfg, os.path.join(self.out_dir, "config.yaml"))
        self.global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * self.world_size
        self.flops_per_sample = train_flops_per_sample(cfg.model, cfg.objective)
        self.peak_tflops = peak_tflops(self.device, self.dtype, cfg.train.peak_tflops)
        self.log.text(f"megaclip: {self.world_size} rank(s) on {self.device.type}, ZeRO stage "
                      f"{stage}, {str(self.dtype).replace('torch.', '')}, global batch "
                      f"{self.global_batch}, {self._num_params() / 1e6:.1f}M parameters"
                      + (f", resumed from {os.path.basename(resume_dir)} at step {self.step}"
                         + ("" if os.path.dirname(resume_dir) == os.path.abspath(self.ckpt_root)
                            else f" (read from {os.path.dirname(resume_dir)})")
                         if resume_dir else ""))
        for note in notes:
            self.log.text(note)
        self.log.text(f"optimiser: {optimizer_name}; "
                      + (f"MFU against {self.peak_tflops:g} TFLOP/s per device"
                         if self.peak_tflops else "no MFU (peak TFLOP/s unknown for this device "
                         "and dtype; set train.peak_tflops)"))
        hosts = [None] * self.world_size
        torch.distributed.all_gather_object(hosts, cluster.host_description())
        by_host: dict[str, list[int]] = {}
        for r, h in enumerate(hosts):
            by_host.setdefault(h, []).append(r)
        self.log.text("ranks by host: " + "; ".join(f"{h}: {rs}" for h, rs in by_host.items())
                      + (f" (Slurm job {os.environ.get('SLURM_JOB_ID')}, rendezvous "
                         f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']})"
                         if from_slurm else ""))
        if self.teacher is not None:
            held, full = self.teacher.memory_bytes()
            self.log.text(f"EMA teacher: fp32, {held / 2**20:.2f} MiB on this rank of "
                          f"{full / 2**20:.2f} MiB ({held / full:.3f}), "
                          f"{'sharded like the student' if self.teacher.partitioned else 'whole'}"
                          f"; its forward: {self.teacher.describe_forward()}")

    def _masking(self) -> Masking | None:
        obj, v = self.cfg.objective, self.cfg.model.vision
        if not obj.uses_masks and obj.text_mlm.weight == 0:
            return None
        return Masking(grid=v.image_size // v.patch_size,
                       image=obj.mask if obj.uses_masks else None,
                       text=obj.text_mlm if obj.text_mlm.weight > 0 else None)

    def _num_params(self) -> int:
        return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                   for p in self.engine.module.parameters())

    # ---------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        cfg, it = self.cfg, iter(self.loader)
        first_step, results = self.step, {}
        last = cfg.train.steps if not self.stop_after else min(cfg.train.steps,
                                                                first_step + self.stop_after)
        sums: dict[str, torch.Tensor] = {}
        # Per log interval: its first step, wall time, time spent waiting for batches, and time
        # spent on evaluation and checkpoints (excluded from the step time).
        log_from, t_log, data_time, other_time = self.step, time.perf_counter(), 0.0, 0.0
        n_good = 0  # steps of the interval whose terms are averaged (skipped ones are not)
        guarded = sorted({*self.objective.weights, "loss"})  # the terms a step's skip looks at
        obj, module = cfg.objective, self.engine.module
        frozen_heads = [(head, section.freeze_prototypes_steps) for head, section in (
            (getattr(module, "distill_head", None), obj.mask_distill),
            (getattr(module, "global_head", None), obj.local_global)) if head is not None]
        while self.step < last:
            lr = warmup_cosine(self.step, cfg.train.steps, cfg.optim.lr, cfg.optim.warmup_steps,
                               cfg.optim.min_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.engine.train()
            for head, freeze_until in frozen_heads:  # DINO's frozen last layer at first
                head.prototypes.frozen = self.step < freeze_until
            step_terms, flags = {}, None
            for _ in range(cfg.train.grad_accum_steps):
                t0 = time.perf_counter()
                batch = next(it)
                data_time += time.perf_counter() - t0
                self.last_batch = batch  # on the host, for the pictures at evaluation
                batch = to_device(batch, self.device, self.dtype, cfg.data.mean, cfg.data.std)
                if (self.step + 1, self.rank) in self.inject_nan:
                    batch["images"] = batch["images"] * float("nan")
                terms = train_step(self.engine, self.objective, batch, self.teacher, self.step)
                # Only what enters the loss decides a skip (a statistic may be NaN harmlessly).
                local = StepGuard.local_flags({k: terms[k] for k in guarded})
                flags = local if flags is None else torch.maximum(flags, local)
                for k, v in terms.items():
                    step_terms[k] = step_terms.get(k, 0) + v.float() / cfg.train.grad_accum_steps
            # One all-reduce: the stop flag and, per term, the ranks where it was not finite.
            stop, bad = reduce_step_flags(self.stop_signal.flags(cfg.train.requeue_signals),
                                          flags, self.device)
            skipped = self.guard.judge(self.step + 1, self.engine.was_step_applied(),
                                       dict(zip(guarded, bad)),
                                       lambda: checkpoint_folder.latest_checkpoint(self.ckpt_root))
            good = skipped is None
            if good:
                n_good += 1
                for k, v in step_terms.items():
                    sums[k] = sums.get(k, 0) + v
            else:
                self.log.text(skipped)
            self.objective.end_step(good)
            log_now = (self.step + 1) % cfg.train.log_every == 0 or self.step + 1 == last
            last_values = {}
            if self.teacher is not None and good:  # the masters are current
                m = momentum_at(self.step, cfg.train.steps, cfg.objective.teacher.momentum,
                                cfg.objective.teacher.momentum_end)
                last_values["teacher_update_rms"] = self.teacher.update(m, measure=log_now)
                self.teacher.prefetch()  # its whole copy's gather overlaps what comes next
                if log_now:
                    last_values["teacher_momentum"] = torch.tensor(m, device=self.device)
            self.step += 1
            self.samples_seen += self.global_batch
            if log_now:
                self._log(sums, last_values, self.step - log_from, n_good, t_log + other_time,
                          data_time, lr)
                sums, log_from, data_time, other_time, n_good = {}, self.step, 0.0, 0.0, 0
                t_log = time.perf_counter()
            # A stop signal is heard before this step's evaluation and periodic checkpoint, so
            # the grace time before SIGKILL goes to the checkpoint alone.
            if sum(stop):
                return self._stop_for_signal(requeue=cluster.asks_requeue(*stop))
            do_eval = cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.eval_set
            do_save = cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0
            if do_eval or do_save:
                self._synchronize()  # the step's GPU work belongs to the step, not to these
                t0 = time.perf_counter()
                if do_eval:
                    results = self.evaluate()
                if do_save:
                    self.save()
                other_time += time.perf_counter() - t0
        if self.teacher is not None:  # no gather left in flight when the process ends
            self.teacher.settle()
        if not (cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0):
            self.save()
        if self.step < cfg.train.steps:  # stopped early on request: no final evaluation
            self.log.text(f"stopping after step {self.step} as asked; resume with --resume auto")
            self.log.close()
            return {}
        if self.eval_set and not (cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0):
            results = self.evaluate()
        if results and self.rank == 0:
            self.log.text(f"final zero-shot top-1 {results['zeroshot_top1']:.4f} on the held-out "
                          f"split ({len(self.eval_set.classnames)} classes, chance "
                          f"{1 / len(self.eval_set.classnames):.4f}) after {self.step} steps")
        self.log.close()
        return results

    def _stop_for_signal(self, requeue: bool) -> dict:
        """Checkpoint first (the grace time before SIGKILL is short), then requeue if the
        signals the ranks received ask for it. At the last step the run is complete: no requeue,
        no evaluation."""
        if self.teacher is not None:
            self.teacher.settle()
        self.save()
        why = self.stop_signal.received or "a signal on another rank"
        finished = self.step >= self.cfg.train.steps
        self.log.text(f"pre-empted by {why} after step {self.step}: checkpoint saved"
                      + ("; training is complete, the final evaluation was skipped (run "
                         "tools/eval.py on the checkpoint)" if finished else ""))
        try:
            if (self.rank == 0 and self.from_slurm and not finished and requeue
                    and self.cfg.train.requeue_on_stop):
                self.log.text(f"requeueing Slurm job {os.environ.get('SLURM_JOB_ID')}; the "
                              f"next run resumes from step {self.step}")
                self.log.text(cluster.requeue())  # a FatalError (exit 1) if it fails
        finally:
            self.log.close()
        return {}

    def close(self) -> None:
        """Shut the data workers down (they outlive stop signals by design); a teacher gather
        every rank started (after the last update) is let finish, whatever ended the run."""
        if getattr(self, "teacher", None) is not None:
            self.teacher.settle()
        if getattr(self, "loader", None) is not None:
            self.loader.close()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _log(self, sums: dict, last: dict, n_steps: int, n_good: int, t_start: float,
             data_time: float, lr: float) -> None:
        """One all-reduce: loss terms and statistics averaged over ranks, skipped samples and
        shards summed. The interval's time runs from ``t_start`` (evaluation and checkpoint writing
        already left out) to now, once the reduce has waited for the device."""
        means = {k: v / max(1, n_good) for k, v in sums.items()}
        means.update({k: v for k, v in last.items() if v is not None})
        skipped = self.loader.state.skipped_total()
        means["data_time_s"] = torch.tensor(data_time / max(1, n_steps), device=self.device)
        shards_read = sum(self.loader.state.shards_read.values())
        packed = pack_for_reduce(means, [float(skipped.get(k, 0)) for k in SKIP_KINDS]
                                 + [float(shards_read)], self.device)
        values, counts = unpack_reduced(all_reduce_sum(packed).tolist(), sorted(means),
                                        self.world_size)
        # The same summed counts on every rank: all of them stop together, or none.
        counts, shards_read = counts[:-1], int(counts[-1])
        self._check_bad_shards(int(counts[SKIP_KINDS.index("shards")]), shards_read)
        step_time = (time.perf_counter() - t_start) / max(1, n_steps)
        per_device = self.global_batch / step_time / self.world_size
        tflops = per_device * self.flops_per_sample / 1e12
        values.update({"lr": lr, "skipped_steps": self.guard.skipped,
                       "samples_per_s": per_device * self.world_size,
                       "step_time_s": step_time, "tflops_per_device": tflops,
                       **({"mfu": tflops / self.peak_tflops} if self.peak_tflops else {}),
                       **memory_figures(self.device)})
        values.update({f"skipped_{k}": c for k, c in zip(SKIP_KINDS, counts)
                       if c or k == "shards"})
        self.log.scalars(self.step, values, "train/")
        self.log.console(self.step, values)

    def _check_bad_shards(self, bad: int, read: int) -> None:
        fraction = self.cfg.data.max_bad_shard_fraction
        if not bad_shards_over_limit(bad, read, fraction):
            return
        named = [None] * self.world_size
        torch.distributed.all_gather_object(named, self.loader.state.first_bad_shards())
        first = [n for names in named for n in names][:FIRST_BAD_NAMED]
        raise UserError(f"{bad} of the {read} shards read so far are bad, clearly more than "
                        f"data.max_bad_shard_fraction={fraction:g}; first: " + "; ".join(first))

    def evaluate(self) -> dict:
        self.engine.eval()
        results = evaluate(self.engine.module, self.eval_set, self.tokenizer,
                           self.cfg.eval.batch_size, self.device, self.dtype)
        if self.cfg.eval.probes:
            trunk = self.teacher.tokens if self.cfg.eval.probe_encoder == "teacher" else None
            results.update(run_probes(self.engine.module, self.eval_set, self.tokenizer,
                                      self.cfg.eval.batch_size, self.device, self.dtype, trunk))
        count = self.cfg.eval.pictures
        if count and self.cfg.train.tensorboard:  # every rank runs the forwards; rank 0 writes
            maps = similarity_maps(self.engine.module, self.eval_set, self.tokenizer, self.device,
                                   self.dtype, count)
            self.log.image(self.step, "eval/patch_text_similarity", maps)
            if getattr(self, "last_batch", None) is not None:
                self.log.image(self.step, "train/samples", training_samples(
                    self.last_batch, self.cfg.data.mean, self.cfg.data.std, count))
        self.engine.train()
        self.log.scalars(self.step, results, "eval/")
        if self.rank == 0:
            self.log.text("eval step %d: %s" % (self.step, ", ".join(
                f"{k} {v:.4f}" for k, v in results.items())))
            with open(os.path.join(self.out_dir, f"eval_step{self.step:08d}.json"), "w") as f:
                json.dump({"step": self.step, **results}, f, indent=1)
        return results

    def save(self) -> str:
        client = {"step": self.step, "samples_seen": self.samples_seen, "config": to_dict(self.cfg),
                  "rng": checkpoint.rng_state(), "data": self.loader.state.state_dict(),
                  "world_size": self.world_size, "optimizer": self.optimizer_kind,
                  **self.guard.state_dict(),
                  "objective": {k: v.cpu() for k, v in self.objective.state_dict().items()}}
        path = checkpoint.save(self.engine, self.ckpt_root, self.step, client,
                               self.cfg.train.keep_checkpoints, self.cfg, self.teacher,
                               protect=self.guard.protected)
        self.log.text(f"saved checkpoint {path}")
        return path
