"""The training loop over a built run (``engine/assembly.py``): optimiser steps, then what follows
each (skip decision, teacher update, logging, stop signals, evaluation, checkpoint)."""
from __future__ import annotations

import os
import time

import torch

from megaclip import cluster
from megaclip.checkpoint.folder import latest_checkpoint, write_json
from megaclip.data.mixture import COUNTERS
from megaclip.data.shard_order import FIRST_BAD_NAMED
from megaclip.data.stream import SKIP_KINDS, bad_shards_over_limit
from megaclip.distributed import all_reduce_sum
from megaclip.engine.accum import accumulates_negatives, train_steps_accumulated
from megaclip.engine.assembly import Run
from megaclip.engine.guard import StepGuard, nan_injections, reduce_step_flags
from megaclip.engine.metrics import memory_figures
from megaclip.engine.schedules import warmup_cosine
from megaclip.engine.staging import StageSwitch
from megaclip.engine.step import to_device, train_step
from megaclip.errors import UserError
from megaclip.eval.pictures import similarity_maps, training_samples
from megaclip.eval.probes import run_probes
from megaclip.eval.zeroshot import evaluate
from megaclip.objectives.flops import mean_flops_per_sample, steps_flops_per_sample


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


class LogWindow:
    """What one log interval gathers: its first step, wall time, time spent waiting for batches,
    time spent on evaluation and checkpoints (left out of the step time), the sums of the terms
    of its applied steps and how many there were (skipped steps are not averaged; a term that
    starts within the interval is averaged over the steps it ran)."""

    def __init__(self, step: int):
        self.first_step, self.t_start = step, time.perf_counter()
        self.data_time = self.other_time = 0.0
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.n_good = 0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        self.n_good += 1
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0) + v
            self.counts[k] = self.counts.get(k, 0) + 1


class Trainer:
    """The loop. ``stop_after``: leave after this many steps of this invocation, with a
    checkpoint (0: run to ``train.steps``)."""

    def __init__(self, run: Run, stop_after: int = 0):
        self.run, self.cfg, self.state = run, run.cfg, run.state
        self.engine, self.objective = run.training.engine, run.training.objective
        self.teacher, self.device = run.training.teacher, run.process.device
        self.log, self.stop_after = run.log, stop_after
        self.inject_nan = nan_injections()  # test hook: empty unless MEGACLIP_INJECT_NAN is set
        self.guarded = sorted({*self.objective.weights, "loss"})  # the terms a skip looks at
        self.last_batch = None  # on the host, for the pictures at evaluation
        training = run.training
        self.stages = training.stages
        self.switch = StageSwitch(training.stages, training.group_starts, self.engine.module,
                                  training.optimizer, self.teacher, self.cfg.objective)

    def fit(self) -> dict:
        try:
            return self._fit()
        except RuntimeError as e:  # torch reports a dead data worker from wherever we were
            self.run.loader.raise_if_a_worker_died(e)
            raise

    def _fit(self) -> dict:
        cfg, state, it = self.cfg, self.state, iter(self.run.loader)
        last = (cfg.train.steps if not self.stop_after
                else min(cfg.train.steps, state.step + self.stop_after))
        window, results = LogWindow(state.step), {}
        if self._data_ran_out_before():
            return {}
        while state.step < last:
            lr = self._prepare_step()
            step_terms, flags = self._step(it, window)
            # One all-reduce: the stop flags (signals, a data source that ran out) and, per
            # term, the ranks where it was not finite.
            stop, bad = reduce_step_flags(
                (*self.run.process.stop_signal.flags(cfg.train.requeue_signals),
                 float(bool(self.run.loader.state.ended))), flags, self.device)
            log_now = ((state.step + 1) % cfg.train.log_every == 0 or state.step + 1 == last
                       or stop[2] > 0)
            last_values = self._after_step(step_terms, bad, window, log_now)
            if log_now:
                self._log(window, last_values, lr)
                window = LogWindow(state.step)
            if stop[2]:  # the end of the data: the end of training, not a pre-emption
                return self._stop_for_data(int(stop[2]))
            # A stop signal is heard before this step's evaluation and periodic checkpoint, so
            # the grace time before SIGKILL goes to the checkpoint alone.
            if sum(stop[:2]):
                return self._stop_for_signal(requeue=cluster.asks_requeue(*stop[:2]))
            results = self._evaluate_and_save(window) or results
        return self._finish(results)

    # --------------------------------------------------------------------------- one step
    def _prepare_step(self) -> float:
        """The step's learning rate into every group that has started; DINO's frozen prototype
        layers at first; the objective's stage (``engine/staging.py``)."""
        cfg, step = self.cfg, self.state.step
        lr = warmup_cosine(step, cfg.train.steps, cfg.optim.lr, cfg.optim.warmup_steps,
                           cfg.optim.min_lr)
        self.switch.set_lr(lr, step)
        self.engine.train()
        line = self.switch.enter(step)
        if line:
            self.log.text(line)
        return lr

    def _next_batch(self, it, window: LogWindow) -> dict:
        """The next micro-batch on the device (the time spent waiting for it is the window's)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        batch = next(it)
        window.data_time += time.perf_counter() - t0
        self.last_batch = batch
        batch = to_device(batch, self.device, self.run.training.dtype, cfg.data.mean,
                          cfg.data.std)
        if (self.state.step + 1, self.run.process.rank) in self.inject_nan:
            batch["images"] = batch["images"] * float("nan")
        return batch

    def _step(self, it, window: LogWindow) -> tuple[dict, torch.Tensor]:
        """One optimiser step of ``grad_accum_steps`` micro-batches: (the terms averaged over
        them, per guarded term whether it was not finite on this rank in any). With
        ``train.accum_negatives`` every micro-batch of the step is read first (the contrastive
        loss sees all of them); otherwise each is read just before it runs."""
        cfg, step_terms, flags = self.cfg, {}, None
        batches = (self._next_batch(it, window) for _ in range(cfg.train.grad_accum_steps))
        if accumulates_negatives(cfg.train):
            logged = train_steps_accumulated(self.engine, self.objective, list(batches),
                                             self.teacher, self.state.step)
        else:
            logged = (train_step(self.engine, self.objective, batch, self.teacher,
                                 self.state.step) for batch in batches)
        for terms in logged:
            # Only what enters the loss decides a skip (a statistic may be NaN harmlessly); a
            # term that has not started is finite.
            local = StepGuard.local_flags({k: terms[k] if k in terms
                                           else torch.zeros_like(terms["loss"])
                                           for k in self.guarded})
            flags = local if flags is None else torch.maximum(flags, local)
            for k, v in terms.items():
                step_terms[k] = step_terms.get(k, 0) + v.float() / cfg.train.grad_accum_steps
        return step_terms, flags

    def _after_step(self, step_terms: dict, bad: list, window: LogWindow, log_now: bool) -> dict:
        """The step applied or skipped on every rank alike; the centres folded in; the teacher
        moved after an applied step; the counters advanced. Returns the last-value statistics
        of a log step."""
        state = self.state
        skipped = state.guard.judge(state.step + 1, self.engine.was_step_applied(),
                                    dict(zip(self.guarded, bad)),
                                    lambda: latest_checkpoint(self.run.ckpt_root))
        good = skipped is None
        if good:
            window.add(step_terms)
        else:
            self.log.text(skipped)
        self.objective.end_step(good)
        last_values = {}
        if self.switch.teacher_runs(state.step) and good:  # the masters are current
            m = self.switch.momentum(state.step)
            last_values["teacher_update_rms"] = self.teacher.update(m, measure=log_now)
            self.teacher.prefetch()  # its whole copy's gather overlaps what comes next
            if log_now:
                last_values["teacher_momentum"] = torch.tensor(m, device=self.device)
        state.step += 1
        state.samples_seen += self.run.global_batch
        return last_values

    def _evaluate_and_save(self, window: LogWindow) -> dict:
        """The periodic evaluation and checkpoint of this step, if due (their time is the
        window's, not the step's)."""
        cfg, step = self.cfg, self.state.step
        do_eval = cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and self.run.eval_set
        do_save = cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0
        results = {}
        if do_eval or do_save:
            self._synchronize()  # the step's GPU work belongs to the step, not to these
            t0 = time.perf_counter()
            if do_eval:
                results = self.evaluate()
            if do_save:
                self.save()
            window.other_time += time.perf_counter() - t0
        return results

    # --------------------------------------------------------------------------- the end
    def _finish(self, results: dict) -> dict:
        """The last checkpoint and, at the last step, the final evaluation."""
        cfg, step, eval_set = self.cfg, self.state.step, self.run.eval_set
        if self.teacher is not None:  # no gather left in flight when the process ends
            self.teacher.settle()
        if not (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0):
            self.save()
        if step < cfg.train.steps:  # stopped early on request: no final evaluation
            self.log.text(f"stopping after step {step} as asked; resume with --resume auto")
            self.log.close()
            return {}
        if eval_set and not (cfg.eval.every_steps and step % cfg.eval.every_steps == 0):
            results = self.evaluate()
        self._report_final(results)
        return results

    def _report_final(self, results: dict) -> None:
        eval_set = self.run.eval_set
        if results and self.run.process.rank == 0:
            self.log.text(f"final zero-shot top-1 {results['zeroshot_top1']:.4f} on the held-out "
                          f"split ({len(eval_set.classnames)} classes, chance "
                          f"{1 / len(eval_set.classnames):.4f}) after {self.state.step} steps")
        self.log.close()

    def _stop_for_data(self, ranks: int) -> dict:
        """A source ran out on ``ranks`` rank(s) under data.on_source_exhausted=stop: training
        ends after this step, with a checkpoint that records why (a resume from it trains no
        further) and the final evaluation."""
        if self.teacher is not None:
            self.teacher.settle()
        notes = self.run.loader.state.ended
        self.state.data_ended = notes[0] if notes else "a source ran out on another rank"
        self.save()
        self.log.text(f"training ends after step {self.state.step} of {self.cfg.train.steps}: "
                      f"{self.state.data_ended} ({ranks} rank(s); data.on_source_exhausted=stop)")
        results = self.evaluate() if self.run.eval_set else {}
        self._report_final(results)
        return results

    def _data_ran_out_before(self) -> bool:
        """Resumed from the checkpoint that ended training when a source ran out: nothing is
        left to train (every rank knows it from its own client state). A stream that restarted
        (other sources) or data.on_source_exhausted=drop trains on."""
        ended, state = self.state.data_ended, self.state
        if ended and self.run.loader.state.resumed and self.cfg.data.on_source_exhausted == "stop":
            self.log.text(f"nothing left to train: training ended at step {state.step} when "
                          f"{ended} (data.on_source_exhausted=stop)")
            self.log.close()
            return True
        state.data_ended = ""
        return False

    def _stop_for_signal(self, requeue: bool) -> dict:
        """Checkpoint first (the grace time before SIGKILL is short), then requeue if the
        signals the ranks received ask for it. At the last step the run is complete: no requeue,
        no evaluation."""
        if self.teacher is not None:
            self.teacher.settle()
        self.save()
        step, process = self.state.step, self.run.process
        why = process.stop_signal.received or "a signal on another rank"
        finished = step >= self.cfg.train.steps
        self.log.text(f"pre-empted by {why} after step {step}: checkpoint saved"
                      + ("; training is complete, the final evaluation was skipped (run "
                         "tools/eval.py --use-run-eval-set on the checkpoint)" if finished else ""))
        try:
            if (process.rank == 0 and process.from_slurm and not finished and requeue
                    and self.cfg.train.requeue_on_stop):
                self.log.text(f"requeueing Slurm job {os.environ.get('SLURM_JOB_ID')}; the "
                              f"next run resumes from step {step}")
                self.log.text(cluster.requeue())  # a FatalError (exit 1) if it fails
        finally:
            self.log.close()
        return {}

    def close(self) -> None:
        self.run.close()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --------------------------------------------------------------------------- logging
    def _log(self, window: LogWindow, last: dict, lr: float) -> None:
        """One all-reduce: loss terms and statistics averaged over ranks, skipped samples and
        shards summed. The interval's time runs from its start (evaluation and checkpoint
        writing left out) to now, once the reduce has waited for the device."""
        run, step = self.run, self.state.step
        n_steps = step - window.first_step
        means = {k: v / max(1, window.counts[k]) for k, v in window.sums.items()}
        means.update({k: v for k, v in last.items() if v is not None})
        stream = run.loader.state
        skipped = stream.skipped_total()
        means["data_time_s"] = torch.tensor(window.data_time / max(1, n_steps), device=self.device)
        shards_read = sum(stream.shards_read.values())
        packed = pack_for_reduce(means, [float(skipped.get(k, 0)) for k in SKIP_KINDS]
                                 + [float(shards_read)], self.device)
        values, counts = unpack_reduced(all_reduce_sum(packed).tolist(), sorted(means),
                                        run.process.world_size)
        # The same summed counts on every rank: all of them stop together, or none.
        counts, shards_read = counts[:-1], int(counts[-1])
        per_source = self._source_counters()
        self._check_bad_shards(int(counts[SKIP_KINDS.index("shards")]), shards_read)
        step_time = (time.perf_counter() - (window.t_start + window.other_time)) / max(1, n_steps)
        per_device = run.global_batch / step_time / run.process.world_size
        # The FLOPs of the steps this interval ran (a term that starts late costs nothing
        # before); the ETA spends the interval's time per FLOP on the FLOPs of the steps left.
        flops = run.flops_per_sample
        eta = step_time * (run.cfg.train.steps - step)
        if self.stages is not None and self.stages.staged:
            model, stages = run.cfg.model, self.stages
            flops = mean_flops_per_sample(model, stages, window.first_step, step)
            eta = step_time * steps_flops_per_sample(model, stages, step,
                                                     run.cfg.train.steps) / flops
        tflops = per_device * flops / 1e12
        values.update({"lr": lr, "skipped_steps": self.state.guard.skipped,
                       "samples_per_s": per_device * run.process.world_size,
                       "step_time_s": step_time, "tflops_per_device": tflops,
                       **({"mfu": tflops / run.peak_tflops} if run.peak_tflops else {}),
                       **memory_figures(self.device)})
        values.update({f"skipped_{k}": c for k, c in zip(SKIP_KINDS, counts)
                       if c or k == "shards"})
        self.log.scalars(step, {**{f"train/{k}": v for k, v in values.items()}, **per_source})
        self.log.console(step, {**values, **per_source}, eta)

    def _source_counters(self) -> dict[str, int]:
        """``data/<source>/<counter>`` over every rank (cumulative; none without data.sources),
        summed in int64: sample counts pass float32's exact range early in a run."""
        names = [s.name for s in self.cfg.data.sources]
        if not names:
            return {}
        totals = self.run.loader.state.source_totals()
        flat = [v for name in names for v in totals.get(name, [0] * len(COUNTERS))]
        summed = all_reduce_sum(torch.tensor(flat, dtype=torch.int64).to(self.device)).tolist()
        return {f"data/{name}/{counter}": summed[i * len(COUNTERS) + j]
                for i, name in enumerate(names) for j, counter in enumerate(COUNTERS)}

    def _check_bad_shards(self, bad: int, read: int) -> None:
        fraction = self.cfg.data.max_bad_shard_fraction
        if not bad_shards_over_limit(bad, read, fraction):
            return
        named = [None] * self.run.process.world_size
        torch.distributed.all_gather_object(named, self.run.loader.state.first_bad_shards())
        first = [n for names in named for n in names][:FIRST_BAD_NAMED]
        raise UserError(f"{bad} of the {read} shards read so far are bad, clearly more than "
                        f"data.max_bad_shard_fraction={fraction:g}; first: " + "; ".join(first))

    # --------------------------------------------------------------------------- evaluate, save
    def evaluate(self) -> dict:
        run, cfg, step = self.run, self.cfg, self.state.step
        dtype, module = run.training.dtype, self.engine.module
        self.engine.eval()
        results = evaluate(module, run.eval_set, run.tokenizer, cfg.eval.batch_size, self.device,
                           dtype)
        if cfg.eval.probes:
            # Before its terms start the teacher is not initialised: the student stands for it
            # (the teacher equals the student at its start).
            trunk = (self.teacher.tokens if cfg.eval.probe_encoder == "teacher"
                     and self.teacher.initialised else None)
            results.update(run_probes(module, run.eval_set, run.tokenizer, cfg.eval.batch_size,
                                      self.device, dtype, trunk))
        count = cfg.eval.pictures
        if count and cfg.train.tensorboard:  # every rank runs the forwards; rank 0 writes
            if module.visual.proj is not None:  # the maps project patches as the class token
                maps = similarity_maps(module, run.eval_set, run.tokenizer, self.device, dtype,
                                       count)
                self.log.image(step, "eval/patch_text_similarity", maps)
            if self.last_batch is not None:
                self.log.image(step, "train/samples", training_samples(
                    self.last_batch, cfg.data.mean, cfg.data.std, count))
        self.engine.train()
        self.log.scalars(step, results, "eval/")
        if run.process.rank == 0:
            self.log.text("eval step %d: %s" % (step, ", ".join(
                f"{k} {v:.4f}" for k, v in results.items())))
            # Whole or absent: a reader (tools/compare_runs.py) never takes half a result.
            write_json(os.path.join(cfg.train.output_dir, f"eval_step{step:08d}.json"),
                       {"step": step, **results}, indent=1)
        return results

    def save(self) -> str:
        path = self.state.save(self.engine, self.run.ckpt_root,
                               self.run.loader.state.state_dict(), self.cfg.train.keep_checkpoints,
                               self.cfg, self.run.training.optimizer_kind)
        self.log.text(f"saved checkpoint {path}")
        return path
