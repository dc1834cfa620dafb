"""Checkpoints: the one place that calls DeepSpeed's save/load.

A checkpoint is written under ``<tag>.tmp`` by every rank (DeepSpeed's shards, megaclip's own
client state and EMA teacher shards), then, once every rank is done, rank 0 writes the
``COMPLETE`` marker (fsynced) and renames the directory to ``<tag>``: a directory named like a
checkpoint is always whole. Saves, renames and deletions happen only under the run's own
checkpoint folder; a checkpoint given to ``--resume`` is only read.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from typing import Optional

import torch
import torch.distributed as dist

from megaclip.config import save_resolved
from megaclip.distributed import barrier, on_rank0, world
from megaclip.errors import FatalError, UserError

MARKER = "COMPLETE"
CONFIG_FILE = "config.yaml"
CLIENT_DIR = "client"
TMP_SUFFIX = ".tmp"
_REPLACED = ".replaced"  # a complete checkpoint a save of the same step is replacing
_DELETE = ".delete"  # a checkpoint retention is removing
_MOVE_INTENT = "MOVING_ASIDE"  # while newer checkpoints are moved aside: the step they follow
_LOCK = "LOCK"
_TAG = re.compile(r"^step(\d+)$")
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_|^rank(\d{5})\.pt$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _TAG.match(name)
        if m and is_complete(os.path.join(root, name)):
            out.append((int(m.group(1)), name))
    return sorted(out)


def latest_checkpoint(root: str) -> Optional[str]:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def marker(tag_dir: str) -> dict:
    with open(os.path.join(tag_dir, MARKER)) as f:
        return json.load(f)


def is_complete(tag_dir: str) -> bool:
    """Whether ``tag_dir`` carries a readable marker (written whole, then renamed into place)."""
    if not os.path.isfile(os.path.join(tag_dir, MARKER)):
        return False
    try:
        return isinstance(marker(tag_dir).get("step"), int)
    except (OSError, ValueError, AttributeError):
        return False


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_interrupted(root: str) -> list[str]:
    """Finish or undo what interrupted writes left under ``root``; returns what it did, one line
    each. A ``<tag>.tmp`` with its marker was complete but not yet renamed: it becomes ``<tag>``
    (unless that exists). One without is removed, as are ``<tag>.replaced`` (the copy a save of
    the same step was replacing: put back if the new one never arrived) and ``<tag>.delete``
    (retention's). A ``<tag>`` directory without a marker is left alone and named: megaclip
    never writes one. Rank 0 only (``on_rank0``), before anything else."""
    if not os.path.isdir(root):
        return []
    done = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        base = name.rsplit(".", 1)[0]
        if name.endswith(TMP_SUFFIX) and _TAG.match(base) and is_complete(path) and \
                marker(path)["step"] == int(_TAG.match(base).group(1)) and \
                not os.path.exists(os.path.join(root, base)):
            os.rename(path, os.path.join(root, base))
            done.append(f"completed {base}: its write had finished, only its rename had not")
        elif name.endswith(TMP_SUFFIX) or name.endswith(_DELETE):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {name}, left by an interrupted checkpoint write"
                        + (" (some of it could not be removed)" if os.path.exists(path) else ""))
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.endswith(_REPLACED) and os.path.isdir(path):
            base = name[:-len(_REPLACED)]
            if is_complete(os.path.join(root, base)):
                shutil.rmtree(path)
            else:
                os.rename(path, os.path.join(root, base))
                done.append(f"restored {base}: the save that was replacing it was interrupted")
        elif _TAG.match(name) and os.path.isdir(path) and not is_complete(path):
            done.append(f"ignored {name}: no {MARKER} marker, not a checkpoint megaclip wrote")
    intent = os.path.join(root, _MOVE_INTENT)
    if os.path.isfile(intent):  # a resume from an older checkpoint was moving newer ones aside
        with open(intent) as f:
            after = json.load(f)["after_step"]
        done += [f"moved {p} aside: finishing the move of an interrupted resume from step "
                 f"{after}" for p in move_aside(root, after)]
        if os.path.exists(intent):
            os.remove(intent)
    for name in os.listdir(root):
        if name.endswith(".partial"):
            os.remove(os.path.join(root, name))
    _fsync_dir(root)
    return done


def move_aside(root: str, after_step: int) -> list[str]:
    """Move the complete checkpoints of ``root`` newer than ``after_step`` into
    ``root/aside-<time>[-n]/`` (a resume from an older one must neither overwrite nor delete
    them); returns where they went. An intent file names ``after_step`` while they move, so a
    move cut short is finished at the next start (``clean_interrupted``) before anything picks
    one of them to resume from."""
    newer = [tag for step, tag in complete_checkpoints(root) if step > after_step]
    if not newer:
        return []
    intent = os.path.join(root, _MOVE_INTENT)
    with open(intent + ".partial", "w") as f:
        json.dump({"after_step": after_step}, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(intent + ".partial", intent)
    _fsync_dir(root)
    stem = os.path.join(root, time.strftime("aside-%Y%m%d-%H%M%S"))
    aside, n = stem, 1
    while os.path.exists(aside):
        aside, n = f"{stem}-{n}", n + 1
    os.makedirs(aside)
    for tag in newer:
        os.rename(os.path.join(root, tag), os.path.join(aside, tag))
    _fsync_dir(root)
    os.remove(intent)
    _fsync_dir(root)
    return [os.path.join(aside, tag) for tag in newer]


def lock_output(root: str):
    """An exclusive lock on ``root`` for this process's lifetime (rank 0), so a second run
    started by mistake on the same output dir is refused before it touches anything. The
    kernel drops it when the process ends, however it ends. Returns the open lock file, or None
    where the file system has no locks (a warning; nothing is refused then)."""
    import fcntl
    import logging
    import socket
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, _LOCK)
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{root} is in use by another run ({holder}); wait for it to end, or "
                        f"give this run another train.output_dir") from None
    except OSError as e:  # e.g. a Lustre mount without -o flock
        f.close()
        logging.getLogger("megaclip").warning("cannot lock %s (%s): nothing stops a second run "
                                              "from using the same output dir", path, e)
        return None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}"
            + (f", Slurm job {os.environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in os.environ
               else "") + "\n")
    f.flush()
    return f


_HELD: list = []  # the lock files this process holds, open until it exits


def prepare_output(root: str, resume: Optional[str]) -> list[str]:
    """Rank 0, first thing: lock the checkpoint folder, refuse a fresh start over existing
    checkpoints, then finish or remove what interrupted writes left (``clean_interrupted``).
    Returns the log lines."""
    lock = lock_output(root)
    if lock is not None:
        _HELD.append(lock)
    if resume in (None, "", "none"):
        _refuse_fresh_start(root)
    return clean_interrupted(root)


def _refuse_fresh_start(root: str) -> None:
    tag = latest_checkpoint(root)
    if tag:
        raise UserError(f"{root} already holds checkpoints (newest: {tag}); continue that "
                        f"run with --resume auto (or --resume {os.path.join(root, tag)}), or "
                        f"give this one another train.output_dir")


def _fsync_files(folder: str, mine) -> None:
    """fsync the files under ``folder`` whose names ``mine(name)`` selects."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if mine(name):
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def _rank_of_file(name: str) -> Optional[int]:
    """The rank that wrote a checkpoint file: DeepSpeed's ``*zero_pp_rank_R_*``, megaclip's
    ``rankRRRRR.pt``; None for the rest (rank 0's)."""
    m = _RANK_FILE.search(name)
    return int(m.group(1) or m.group(2)) if m else None


def _finish_save(root: str, tag: str, step: int, client_state: dict, keep: int, cfg,
                 protect: tuple) -> None:
    """Rank 0, once every rank's files are written and fsynced: the marker, the rename (a save
    of a step already saved moves the old copy out of the way first, so one of the two is always
    there), then retention (each old checkpoint renamed before it is removed)."""
    tmp, final = os.path.join(root, tag + TMP_SUFFIX), os.path.join(root, tag)
    if cfg is not None:
        save_resolved(cfg, os.path.join(tmp, CONFIG_FILE))
    _fsync_files(tmp, lambda name: _rank_of_file(name) is None)
    for dirpath, _, _ in os.walk(tmp):
        _fsync_dir(dirpath)
    partial = os.path.join(tmp, MARKER + ".partial")  # a marker is whole or absent
    with open(partial, "w") as f:
        json.dump({"step": step, "optimizer": client_state.get("optimizer"),
                   "world_size": world()[1]}, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(partial, os.path.join(tmp, MARKER))
    _fsync_dir(tmp)
    replaced = final + _REPLACED
    if os.path.isdir(final):  # the same step saved twice (a stop right after a save)
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync_dir(root)
    if os.path.isdir(replaced):
        shutil.rmtree(replaced)
    old = complete_checkpoints(root)[:-keep] if keep > 0 else []
    for _, name in old:
        if name not in protect:
            gone = os.path.join(root, name + _DELETE)
            os.rename(os.path.join(root, name), gone)
            shutil.rmtree(gone, ignore_errors=True)
    _fsync_dir(root)


def save(engine, root: str, step: int, client_state: dict, keep: int, cfg=None,
         teacher=None, protect: tuple = ()) -> str:
    """Write on every rank under ``<tag>.tmp`` (each rank fsyncs its own files), then mark
    complete and rename (rank 0). Keeps the ``keep`` newest complete checkpoints, and those
    named in ``protect`` whatever their age."""
    rank = world()[0]
    tag = tag_for(step)
    tmp = os.path.join(root, tag + TMP_SUFFIX)
    engine.save_checkpoint(root, tag=tag + TMP_SUFFIX, client_state={}, save_latest=False)
    os.makedirs(os.path.join(tmp, CLIENT_DIR), exist_ok=True)
    torch.save(client_state, os.path.join(tmp, CLIENT_DIR, f"rank{rank:05d}.pt"))
    if teacher is not None:
        save_teacher(tmp, teacher)
    _fsync_files(tmp, lambda name: _rank_of_file(name) == rank)
    barrier()  # every rank's files are written and on disk
    on_rank0(_finish_save, root, tag, step, client_state, keep, cfg, tuple(protect))
    return os.path.join(root, tag)


def choose_resume(root: str, resume: Optional[str]) -> Optional[str]:
    """The checkpoint directory to resume from, chosen by rank 0 (``auto``: the newest complete
    one under ``root``; or the path given) and checked by every rank: one that does not see it
    complete, or sees another step, is an error naming the ranks. Without ``--resume``, a
    ``root`` that already holds checkpoints is an error: a fresh run would overwrite them or
    let retention delete them."""
    rank, ws = world()
    path = on_rank0(_pick_resume, root, resume)
    if path is None:
        return None
    seen = marker(path)["step"] if is_complete(path) else None
    views = [seen]
    if ws > 1:
        views = [None] * ws
        dist.all_gather_object(views, seen)
    blind = [r for r, v in enumerate(views) if v != views[0]]
    if blind or views[0] is None:
        raise UserError(f"rank 0 chose {path} (step {views[0]}) to resume from, but ranks "
                        f"{blind} see {[views[r] for r in blind]}: is the checkpoint folder on a "
                        f"file system every node shares, and up to date?")
    return path


def _pick_resume(root: str, resume: Optional[str]) -> Optional[str]:
    if resume in (None, "", "none"):
        _refuse_fresh_start(root)  # prepare_output refused already; a check that stays true
        return None
    if resume == "auto":
        tag = latest_checkpoint(root)
        return os.path.join(root, tag) if tag else None
    path = os.path.abspath(resume.rstrip("/"))
    if not is_complete(path):
        raise UserError(f"--resume {resume}: not a complete megaclip checkpoint directory "
                        f"(no {MARKER} marker)")
    return path


def check_optimizer(tag_dir: str, kind: str) -> None:
    """Refuse to load optimiser state written by another optimiser class (their states differ:
    DeepSpeed's FusedAdam keeps no per-parameter step, torch's AdamW needs one)."""
    saved = marker(tag_dir).get("optimizer")
    if saved and saved != kind:
        raise UserError(f"checkpoint {tag_dir} holds the state of {saved}, but "
                        f"this run built {kind}: set optim.impl to the optimiser it was trained "
                        f"with (and make it load on this machine) to resume")


def saved_world_size(tag_dir: str) -> int:
    """How many ranks wrote a checkpoint (its marker says; older ones: count the shard files)."""
    ws = marker(tag_dir).get("world_size")
    if ws:
        return int(ws)
    return len([f for f in os.listdir(tag_dir) if f.endswith("_optim_states.pt")]) or 1


def _to_universal(tag_dir: str, scratch: str) -> str:
    """DeepSpeed's universal checkpoint of ``tag_dir`` (per-parameter fp32 weights and optimiser
    states, loadable at any world size), written by rank 0 under ``scratch`` and shared (a
    failure is every rank's error); returns its path."""
    out = os.path.join(scratch, os.path.basename(tag_dir) + ".universal" + TMP_SUFFIX)
    return on_rank0(_convert_universal, tag_dir, scratch, out)


def _convert_universal(tag_dir: str, scratch: str, out: str) -> str:
    import subprocess
    import sys
    os.makedirs(scratch, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    workers = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", tag_dir, "--output_folder", out,
                           "--num_extract_workers", workers, "--num_merge_workers", workers],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise FatalError(f"converting {tag_dir} to a universal checkpoint (to resume at another "
                         f"world size) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return out


def load(engine, tag_dir: str, scratch: str) -> dict:
    """Restore model, optimiser and fp32 master shards; returns this rank's client state (read
    with ``weights_only=True``: plain containers and tensors only). A checkpoint written at
    another world size goes through DeepSpeed's universal format, converted under ``scratch``
    (the run's own checkpoint folder; the source is only read), and every rank gets rank 0's
    client state without its RNG."""
    rank, ws = world()
    saved_ws = saved_world_size(tag_dir)
    source, universal = tag_dir, None
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    # DeepSpeed's universal load gives every parameter group the hyperparameters of the first
    # (weight decay included, so the no-decay group would be decayed); ours come from the config.
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    if saved_ws != ws:
        source = universal = _to_universal(tag_dir, scratch)
        engine._config.load_universal_checkpoint = True
    try:
        path, ds_client = engine.load_checkpoint(os.path.dirname(source),
                                                 tag=os.path.basename(source),
                                                 load_module_strict=True,
                                                 load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
    finally:
        engine._config.load_universal_checkpoint = False
    if universal is not None:
        for group, kept in zip(inner.param_groups, groups):
            group.update(kept)
        _own_step_tensors(inner)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    if universal is not None:
        barrier()
        if rank == 0:
            shutil.rmtree(universal, ignore_errors=True)
    own = os.path.join(tag_dir, CLIENT_DIR, f"rank{rank if saved_ws == ws else 0:05d}.pt")
    if not os.path.isfile(own):
        return ds_client  # written before megaclip kept its client state apart
    client = torch.load(own, map_location="cpu", weights_only=True)
    if saved_ws != ws:
        client.pop("rng", None)  # rank 0's generator state is not every rank's
    return client


def _own_step_tensors(optimizer) -> None:
    """After DeepSpeed's universal load: every Adam state gets its own ``step`` tensor (DeepSpeed
    shares one among the groups, which Adam advances once per group), where torch's Adam would
    have made it: on the parameter's device for the fused and capturable kernels (fused AdamW
    on CUDA refuses a host step), else on the host."""
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for param, state in optimizer.state.items():
        if torch.is_tensor(state.get("step")):
            step = state["step"].detach().clone()
            state["step"] = (step.to(param.device, torch.float32) if on_device and
                             torch.is_tensor(param) else step)


# --------------------------------------------------------------------------- EMA teacher
TEACHER_DIR = "teacher"


def shard_of(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s ZeRO-3 partition of a parameter: the flat tensor zero-padded to a multiple
    of ``world_size``, cut in equal parts (DeepSpeed's layout)."""
    flat = full.reshape(-1)
    size = -(-flat.numel() // world_size)
    padded = torch.zeros(size * world_size, dtype=flat.dtype)
    padded[: flat.numel()] = flat
    return padded[rank * size:(rank + 1) * size].clone()


def unshard(shards: list[torch.Tensor], numel: int, shape: tuple) -> torch.Tensor:
    """Inverse of ``shard_of`` over every rank's shard."""
    return torch.cat([s.reshape(-1) for s in shards])[:numel].reshape(shape).clone()


def save_teacher(tag_dir: str, teacher) -> None:
    """Every rank writes its fp32 shards (ZeRO-3); with whole parameters rank 0 writes them."""
    rank, ws = world()
    if not teacher.partitioned and rank != 0:
        return
    os.makedirs(os.path.join(tag_dir, TEACHER_DIR), exist_ok=True)
    shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p, _ in teacher.pairs}
    torch.save({"partitioned": teacher.partitioned, "world_size": ws, "rank": rank,
                "numel": teacher.full_numels(), "shape": shapes, "ema": teacher.state_dict()},
               os.path.join(tag_dir, TEACHER_DIR, f"rank{rank:05d}.pt"))


def consolidate_teacher(tag_dir: str) -> dict[str, torch.Tensor]:
    """The whole fp32 EMA teacher (names ``trunk.*``, ``head.*``) from a checkpoint's shards."""
    folder = os.path.join(tag_dir, TEACHER_DIR)
    files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if not files:
        raise UserError(f"checkpoint {tag_dir} holds no EMA teacher")
    parts = [torch.load(os.path.join(folder, f), map_location="cpu", weights_only=True)
             for f in files]
    head = parts[0]
    if not head["partitioned"]:
        return head["ema"]
    if len(parts) != head["world_size"]:
        raise UserError(f"checkpoint {tag_dir} has {len(parts)} of {head['world_size']} "
                        f"teacher shards")
    parts.sort(key=lambda d: d["rank"])
    return {name: unshard([d["ema"][name] for d in parts], head["numel"][name],
                          head["shape"][name]) for name in head["ema"]}


def load_teacher(tag_dir: str, teacher) -> None:
    """Restore the fp32 EMA: this rank's own shard when the world size is unchanged, otherwise
    the consolidated teacher cut for the current ranks."""
    rank, ws = world()
    own = os.path.join(tag_dir, TEACHER_DIR, f"rank{rank:05d}.pt")
    if teacher.partitioned and os.path.isfile(own):
        saved = torch.load(own, map_location="cpu", weights_only=True)
        if saved["partitioned"] and saved["world_size"] == ws:
            teacher.load_state_dict(saved["ema"])
            return
    full = consolidate_teacher(tag_dir)
    if teacher.partitioned:
        full = {k: shard_of(v, rank, ws) for k, v in full.items()}
    teacher.load_state_dict(full)


def consolidate(tag_dir: str) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a checkpoint, from every rank's master shards
    (DeepSpeed's own zero_to_fp32 reader; runs on one CPU process, any ZeRO stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    tag_dir = os.path.abspath(tag_dir.rstrip("/"))
    if not os.path.isfile(os.path.join(tag_dir, MARKER)):
        raise UserError(f"'{tag_dir}' is not a complete megaclip checkpoint directory")
    state = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(tag_dir),
                                                     tag=os.path.basename(tag_dir))
    return {k: v.float() for k, v in state.items()}


def checkpoint_config(tag_dir: str):
    """The resolved config a checkpoint was trained with."""
    from megaclip.config import config_from_dict
    import yaml
    path = os.path.join(tag_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f"'{tag_dir}' has no {CONFIG_FILE}; is it a megaclip checkpoint?")
    with open(path) as f:
        return config_from_dict(yaml.safe_load(f))


def load_for_inference(tag_dir: str):
    """(model in eval mode with fp32 weights, resolved config) from a checkpoint directory."""
    from megaclip.models import build_model
    cfg = checkpoint_config(tag_dir)
    model = build_model(cfg.model, cfg.objective, seed=0)
    missing, unexpected = model.load_state_dict(consolidate(tag_dir), strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {tag_dir} does not match its config: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    return model.eval(), cfg
