"""Building a run, in this order (each step a function with explicit arguments):

1. ``start_process``: this rank's device (before any model, tensor, process group or data
   worker), the precision check, the stop-signal handlers, the process group;
2. the tokenizer and ``resolve_config``: the config resolved once, read-only afterwards;
3. ``choose_checkpoint``: the output folder locked and tidied, the checkpoint to resume from
   chosen (a fresh start loads ``model.init_from``, a resumed run does not);
4. ``build_training``: DeepSpeed config, model (partitioned as it is created under ZeRO-3),
   pretrained weights, locked towers, optimiser, engine, the objective's loss, the EMA teacher;
5. ``resume``: the checkpoint restored into the ``TrainState``;
6. the data stream (from the restored position), the evaluation set and the logger.

``build_run`` runs them all for training; the benchmark (``bench/objectives.py``) runs 1, the
config resolution and 4.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from megaclip import cluster
from megaclip.checkpoint import folder as checkpoint_folder
from megaclip.checkpoint.io import check_optimizer, choose_resume
from megaclip.checkpoint.train_state import TrainState, check_tokenizer, tokenizer_record
from megaclip.config import Config, save_resolved
from megaclip.data.eval_set import EvalSet
from megaclip.data.masks import masking_for
from megaclip.data.mixture import expand_sources
from megaclip.data.plan import data_plan
from megaclip.data.stream import TrainLoader, build_train_loader
from megaclip.data.tokenizer import Tokenizer
from megaclip.data.views import MultiCrop
from megaclip.distributed import default_env, init_distributed, on_rank0, setup_device, world
from megaclip.engine.accum import accumulates_negatives
from megaclip.engine.ds_config import check_precision, merge_ds_config, model_dtype, zero_stage
from megaclip.engine.guard import StepGuard
from megaclip.engine.metrics import MetricLogger, peak_tflops
from megaclip.engine.init_from import load_init_weights
from megaclip.engine.optim import (build_optimizer, check_group_layout, groups_summary,
                                   staged_param_groups)
from megaclip.errors import UserError
from megaclip.extensions import setup_extensions
from megaclip.models.build import build_model
from megaclip.models.layers import check_locks, depths, lock_towers
from megaclip.models.presets import check_multicrop, context_length, resolve_model_config
from megaclip.objectives.flops import train_flops_per_sample
from megaclip.objectives.loss import ObjectiveLoss
from megaclip.objectives.stages import Stages
from megaclip.teacher.build import build_ema_teacher
from megaclip.teacher.ema import EmaTeacher

DEATHS_FILE = "data_worker_deaths.txt"  # shards a data worker died reading, skipped on resume


@dataclass
class Process:
    """Where this rank runs; set up before anything else."""
    device: torch.device
    rank: int
    world_size: int
    from_slurm: bool  # an srun task: the rendezvous came from Slurm's variables
    stop_signal: Optional[cluster.StopSignal]  # None: no handlers (the benchmark)
    extensions: str = ""  # where DeepSpeed's ops compile (megaclip/extensions.py)


def start_process(ds_config: dict, ds_source: str = "DeepSpeed config",
                  stop_signals: Optional[tuple] = None, before_init=None,
                  slurm: bool = True, dist_timeout_min: Optional[float] = None) -> Process:
    """The rank's device (``cuda:LOCAL_RANK``, chosen before anything touches a GPU), the
    precision check, the stop-signal handlers (before data workers fork, so they inherit the
    handler instead of dying of it; None: none installed) and the process group.
    ``before_init``: called just before the process group starts (collective counters).
    ``slurm``: an srun task takes its rendezvous from Slurm's variables.
    ``dist_timeout_min``: the process group's timeout (None: DeepSpeed's default)."""
    from_slurm = slurm and cluster.setup_from_slurm()
    default_env()
    extensions = setup_extensions()
    device = setup_device(slurm_task=from_slurm)
    check_precision(ds_config, device, ds_source)
    stop = cluster.StopSignal(tuple(stop_signals)) if stop_signals is not None else None
    if before_init is not None:
        before_init()
    init_distributed(**({} if dist_timeout_min is None
                        else {"timeout": datetime.timedelta(minutes=dist_timeout_min)}))
    rank, world_size = world()
    return Process(device, rank, world_size, from_slurm, stop, extensions)


def resolve_config(cfg: Config, vocab_size: int) -> Config:
    """Fill what the experiment file leaves to the model preset and the tokenizer."""
    model = resolve_model_config(cfg.model, vocab_size)
    check_multicrop(model, cfg.objective)
    check_locks(model, cfg.objective)
    return dataclasses.replace(cfg, model=model)


@dataclass
class Training:
    """What a step runs on: the DeepSpeed engine and its optimiser, the objective's loss and the
    EMA teacher (None without one)."""
    ds_config: dict
    dtype: torch.dtype
    stage: int
    engine: object
    optimizer: object  # DeepSpeed's wrapper of the one below
    optimizer_name: str  # which implementation runs, and why
    optimizer_kind: str  # its class, recorded in every checkpoint
    objective: ObjectiveLoss
    teacher: Optional[EmaTeacher]
    notes: list = field(default_factory=list)  # for the log: pretrained weights, locks, groups
    # When the objective's terms start (objective.<term>.start_at), and the first step of each
    # of the optimiser's parameter groups (0, or the start of the terms whose modules it holds).
    stages: Optional[Stages] = None
    group_starts: tuple = ()

    def num_params(self) -> int:
        return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                   for p in self.engine.module.parameters())


def build_training(cfg: Config, ds_config: dict, world_size: int, device: torch.device,
                   ds_source: str = "DeepSpeed config", fresh: bool = True) -> Training:
    """DeepSpeed config -> model (``zero.Init`` under ZeRO-3) -> pretrained weights
    (``model.init_from``, when ``fresh``: not for a run that resumes) -> locked towers ->
    optimiser -> engine -> the objective's loss -> EMA teacher (so it starts from the loaded
    weights), from a resolved ``cfg``."""
    import deepspeed
    ds = merge_ds_config(ds_config, cfg.train, world_size, ds_source)
    dtype, stage = model_dtype(ds), zero_stage(ds)
    zero3 = ds if stage == 3 else None
    model = build_model(cfg.model, cfg.objective, cfg.train.seed, zero3, dtype)
    notes = []
    if cfg.model.init_from:
        notes += (load_init_weights(model, cfg.model) if fresh else
                  [f"init_from: {cfg.model.init_from} not read: the run resumes from a "
                   f"checkpoint, whose weights it takes"])
    locked = lock_towers(model, cfg.model)
    notes += [f"{tower} tower locked: {n} parameter tensors get no updates"
              for tower, n in locked.items() if n]
    stages = Stages(cfg.objective, cfg.train.steps)
    groups, group_starts = staged_param_groups(model, cfg.optim.weight_decay,
                                               stages.later_params(), cfg.optim.layer_decay,
                                               depths(cfg.model))
    notes += [line for line in [groups_summary(groups, cfg.optim.layer_decay)] if line]
    optimizer, optimizer_name = build_optimizer(cfg.optim, groups, device.type)
    kind = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    objective = ObjectiveLoss(cfg.objective, cfg.train.steps).to(device)
    teacher = None
    if cfg.objective.uses_teacher:  # initialised now, or from the student when its terms start
        teacher = build_ema_teacher(engine.module, cfg.model, cfg.objective, zero3, dtype, device,
                                    initialise=stages.teacher_start == 0)
    return Training(ds, dtype, stage, engine, optimizer, optimizer_name, kind, objective, teacher,
                    notes, stages, tuple(group_starts))


def choose_checkpoint(ckpt_root: str, resume_arg: Optional[str]
                      ) -> tuple[Optional[str], list[str]]:
    """Lock and tidy the checkpoint folder (what interrupted writes left is finished or removed,
    never resumed from as is) and choose the checkpoint (rank 0; every rank checks it).
    Returns (the checkpoint to resume from or None, notes for the log)."""
    notes = list(on_rank0(checkpoint_folder.prepare_output, ckpt_root, resume_arg))
    return choose_resume(ckpt_root, resume_arg), notes


def resume(state: TrainState, training: Training, ckpt_root: str, resume_arg: Optional[str],
           eval_dir: Optional[str] = None, conversion_timeout_s: Optional[float] = None,
           chosen: Optional[tuple[Optional[str], list[str]]] = None, cfg: Optional[Config] = None
           ) -> tuple[Optional[str], list[str]]:
    """Choose the checkpoint (``choose_checkpoint``, unless ``chosen`` is its answer), check it
    was trained with this run's tokenizer file (and, given ``cfg``, the same parameter groups)
    and restore it into ``state``. Returns (the checkpoint resumed from or None, notes for the
    log). ``eval_dir``: where the run writes its ``eval_stepN.json`` (those newer than the
    checkpoint are moved aside with its newer checkpoints); ``conversion_timeout_s``: how long
    ranks wait for rank 0 to convert a checkpoint of another world size (None: ``io.load``'s
    default)."""
    resume_dir, notes = chosen if chosen is not None else choose_checkpoint(ckpt_root, resume_arg)
    notes = list(notes)
    if resume_dir is not None:
        check_optimizer(resume_dir, training.optimizer_kind)
        if cfg is not None:
            check_group_layout(resume_dir, cfg)
        if training.stages is not None:
            on_rank0(check_stages, resume_dir, training.stages)
        if state.tokenizer is not None:
            notes += on_rank0(check_tokenizer, resume_dir, state.tokenizer["path"])
        state.restore(training.engine, resume_dir, ckpt_root, conversion_timeout_s)
        # Newer checkpoints and results of this run: kept, out of the way.
        notes += [f"moved {p} aside: resuming from the older {resume_dir}"
                  for p in on_rank0(checkpoint_folder.move_aside, ckpt_root, state.step,
                                    eval_dir)]
    return resume_dir, notes


def check_stages(tag_dir: str, stages: Stages) -> None:
    """Refuse a checkpoint whose optimiser state has other parameter groups than this run's:
    the modules of terms that start late have groups of their own (``staged_param_groups``), in
    the order of their starts, so a resume may move a start that neither run has reached, but
    not start together terms that started apart, swap two starts, move a start the checkpoint
    (``stepN``: N steps done) has passed or would pass, or start late a term that started with
    the run (or the reverse)."""
    from megaclip.checkpoint.inference import checkpoint_config
    try:
        saved = checkpoint_config(tag_dir)
    except UserError:  # no config of its own: nothing to compare
        return
    before = Stages(saved.objective, saved.train.steps)
    done = re.match(r"^step(\d+)$", os.path.basename(os.path.normpath(tag_dir)))
    done = int(done.group(1)) if done else 0
    passed = [attr for attr in set(before.starts) & set(stages.starts)
              if before.starts[attr] != stages.starts[attr]
              and min(before.starts[attr], stages.starts[attr]) < done]
    if list(before.later_params().values()) != list(stages.later_params().values()) or passed:
        raise UserError(f"checkpoint {tag_dir} was trained with other {before.describe()}; "
                        f"this run has {stages.describe()}. Terms that start late train in "
                        f"optimiser groups of their own, started at their step: resume with the "
                        f"start_at values it was trained with (a start neither has reached, "
                        f"after step {done}, may move)")


def build_loader(cfg: Config, tokenizer: Tokenizer, process: Process, state: TrainState,
                 urls, stages: Optional[Stages] = None) -> TrainLoader:
    """This rank's stream, from the position ``state`` restored (or the start); with
    ``stages``, each micro-batch draws the views and masks of its step's stage."""
    v, obj = cfg.model.vision, cfg.objective
    return build_train_loader(
        cfg.data, v.image_size, tokenizer, cfg.train.micro_batch_size, process.rank,
        process.world_size, state.stream, restart_seed=state.step,
        masking=masking_for(v.image_size, v.patch_size, obj), urls=urls,
        stop_signals=tuple(cfg.train.stop_signals),
        multicrop=(MultiCrop(v.image_size, obj.local_global, cfg.data.crop_ratio)
                   if obj.uses_multicrop else None),
        pin_memory=process.device.type == "cuda",
        deaths_file=os.path.join(cfg.train.output_dir, DEATHS_FILE),
        plan=(data_plan(stages, v.image_size, v.patch_size, state.step,
                        cfg.train.grad_accum_steps) if stages is not None else None))


@dataclass
class Run:
    """A training run, built: everything the loop reads."""
    cfg: Config  # resolved
    process: Process
    tokenizer: Tokenizer
    training: Training
    state: TrainState
    ckpt_root: str
    loader: TrainLoader
    eval_set: Optional[EvalSet]
    log: MetricLogger
    global_batch: int
    flops_per_sample: float
    peak_tflops: Optional[float]

    def close(self) -> None:
        """Shut the data workers down (they outlive stop signals by design); a teacher gather
        every rank started (after the last update) is let finish, whatever ended the run."""
        if self.training.teacher is not None:
            self.training.teacher.settle()
        self.loader.close()


def build_run(cfg: Config, ds_config: dict, resume_arg: Optional[str] = None,
              ds_source: str = "DeepSpeed config") -> Run:
    """Every part of a training run, in the order of this module's docstring."""
    process = start_process(ds_config, ds_source, tuple(cfg.train.stop_signals),
                            dist_timeout_min=cfg.train.dist_timeout_min)
    # Checked by rank 0 alone and shared: fail fast, before any rank builds a model.
    urls = expand_sources(cfg.data)
    torch.manual_seed(cfg.train.seed)
    tokenizer = Tokenizer(cfg.data.tokenizer, context_length(cfg.model))
    cfg = resolve_config(cfg, tokenizer.vocab_size)
    if cfg.model.text.context_length != tokenizer.context_length:  # an invariant
        raise AssertionError("tokenizer built with another context length")
    out_dir = cfg.train.output_dir
    ckpt_root = os.path.abspath(os.path.join(out_dir, "checkpoints"))
    chosen = choose_checkpoint(ckpt_root, resume_arg)
    training = build_training(cfg, ds_config, process.world_size, process.device, ds_source,
                              fresh=chosen[0] is None)
    state = TrainState(StepGuard(cfg.train.max_skipped_steps_in_a_row), training.objective,
                       training.teacher, on_rank0(tokenizer_record, cfg.data.tokenizer))
    resume_dir, notes = resume(state, training, ckpt_root, resume_arg, os.path.abspath(out_dir),
                               60 * cfg.train.universal_conversion_timeout_min, chosen, cfg)
    notes = training.notes + notes
    loader = build_loader(cfg, tokenizer, process, state, urls, training.stages)
    d = cfg.data
    eval_set = (EvalSet(cfg.eval.shards, cfg.eval.classes, cfg.model.vision.image_size, d.mean,
                        d.std, d.image_keys, d.caption_key, d.max_image_pixels, d.image_formats,
                        d.max_member_bytes)
                if cfg.eval.shards else None)
    log = MetricLogger(os.path.join(out_dir, "tensorboard") if cfg.train.tensorboard else None,
                       process.rank == 0, cfg.train.steps, os.path.join(out_dir, "metrics.jsonl"))
    if process.rank == 0:
        save_resolved(cfg, os.path.join(out_dir, "config.yaml"))
    run = Run(cfg, process, tokenizer, training, state, ckpt_root, loader, eval_set, log,
              cfg.train.micro_batch_size * cfg.train.grad_accum_steps * process.world_size,
              train_flops_per_sample(cfg.model, cfg.objective),
              peak_tflops(process.device, training.dtype, cfg.train.peak_tflops))
    describe(run, resume_dir, notes)
    return run


def describe(run: Run, resume_dir: Optional[str], notes: list[str]) -> None:
    """The log's opening lines: ranks, precision, size, where it resumed from, the leaf blocks,
    the optimiser, the ranks by host, the teacher."""
    from deepspeed.utils import z3_leaf_module
    p, t, log = run.process, run.training, run.log
    log.text(f"megaclip: {p.world_size} rank(s) on {p.device.type}, ZeRO stage {t.stage}, "
             f"{str(t.dtype).replace('torch.', '')}, global batch {run.global_batch}, "
             f"{t.num_params() / 1e6:.1f}M parameters"
             + (f", resumed from {os.path.basename(resume_dir)} at step {run.state.step}"
                + ("" if os.path.dirname(resume_dir) == os.path.abspath(run.ckpt_root)
                   else f" (read from {os.path.dirname(resume_dir)})")
                if resume_dir else ""))
    for note in notes:
        log.text(note)
    if t.stage == 3:
        model = t.engine.module
        leaves = {g: sum(z3_leaf_module(b) for b in blocks)
                  for g, blocks in model.leaf_blocks().items()}
        log.text("ZeRO-3 leaf blocks: " + ", ".join(f"{g} {n}" for g, n in leaves.items())
                 if any(leaves.values()) else
                 "ZeRO-3 per-module hooks (model.zero3_leaf_blocks=false)")
    train = run.cfg.train
    if train.accum_negatives:
        log.text(f"contrastive negatives: all {run.global_batch} samples of the step's "
                 f"{train.grad_accum_steps} micro-batches (train.accum_negatives; one more "
                 f"forward per micro-batch)" if accumulates_negatives(train) else
                 "train.accum_negatives changes nothing with train.grad_accum_steps=1: the "
                 "contrastive loss already sees the whole global batch")
    log.text(f"optimiser: {t.optimizer_name}; "
             + (f"MFU against {run.peak_tflops:g} TFLOP/s per device"
                if run.peak_tflops else "no MFU (peak TFLOP/s unknown for this device "
                "and dtype; set train.peak_tflops)")
             + (f"; {p.extensions}" if p.extensions else ""))
    data = run.cfg.data
    if data.sources:
        log.text("data sources (weight): " + ", ".join(f"{s.name} ({s.weight:g})"
                                                      for s in data.sources)
                 + f"; a source that runs out: {data.on_source_exhausted}")
    hosts = [None] * p.world_size
    torch.distributed.all_gather_object(hosts, cluster.host_description())
    by_host: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        by_host.setdefault(h, []).append(r)
    log.text("ranks by host: " + "; ".join(f"{h}: {rs}" for h, rs in by_host.items())
             + (f" (Slurm job {os.environ.get('SLURM_JOB_ID')}, rendezvous "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']})"
                if p.from_slurm else ""))
    if t.teacher is not None:
        held, full = t.teacher.memory_bytes()
        layout = ("sharded like the student" if t.teacher.partitioned else
                  "this rank's fragments of the optimiser's fp32 masters"
                  if t.teacher.fragments is not None else "whole")
        log.text(f"EMA teacher: fp32, {held / 2**20:.2f} MiB on this rank of "
                 f"{full / 2**20:.2f} MiB ({held / full:.3f}), {layout}; its forward: "
                 f"{t.teacher.describe_forward()}"
                 + ("" if t.teacher.initialised else
                    f"; not in use before step {t.stages.teacher_start}"))
    if t.stages is not None and t.stages.staged:
        model, stages = run.cfg.model, t.stages
        costs = ", ".join(f"{train_flops_per_sample(model, stages.at(b)) / 1e9:.3g}"
                          for b in [0, *stages.boundaries])
        log.text(f"{stages.describe()}; model GFLOPs per sample by stage: {costs}")
