"""DeepSpeed's side of a checkpoint: the one place that calls its save and load.

A checkpoint is written under ``<tag>.tmp`` by every rank (DeepSpeed's shards, then megaclip's
own files of the rank, each rank fsyncing its own), then, once every rank is done, rank 0
writes the ``COMPLETE`` marker and renames the directory to ``<tag>``: a directory named like a
checkpoint is always whole. What megaclip's own files hold is ``train_state.py``; the folder's
naming, locking and housekeeping are ``folder.py``; a checkpoint given to ``--resume`` is only
read, and every file of it weights-only (``safe_load.py``): one from elsewhere runs no code.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megaclip.checkpoint.folder import (MARKER, TMP_SUFFIX, fsync_dir, is_complete,
                                        latest_checkpoint, marker, publish, tag_for,
                                        write_marker)
from megaclip.checkpoint.frozen import restore_frozen
from megaclip.checkpoint.safe_load import check_files, weights_only_env, weights_only_loads
from megaclip.config import save_resolved
from megaclip.distributed import barrier, on_rank0, rank, world
from megaclip.errors import FatalError, UserError

CONFIG_FILE = "config.yaml"
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONVERSION_DELAY_ENV = "MEGACLIP_TEST_CONVERSION_DELAY_S"  # tests only: rank 0 sleeps first
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_|^rank(\d{5})\.pt$")


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


def _finish_save(root: str, tag: str, step: int, optimizer_kind: Optional[str], keep: int, cfg,
                 protect: tuple) -> None:
    """Rank 0, once every rank's files are written and fsynced: its own files, the marker, then
    the rename and retention (``folder.publish``)."""
    tmp = os.path.join(root, tag + TMP_SUFFIX)
    if cfg is not None:
        save_resolved(cfg, os.path.join(tmp, CONFIG_FILE))
    _fsync_files(tmp, lambda name: _rank_of_file(name) is None)
    for dirpath, _, _ in os.walk(tmp):
        fsync_dir(dirpath)
    write_marker(tmp, {"step": step, "optimizer": optimizer_kind, "world_size": world()[1]})
    publish(root, tag, keep, protect)


def save(engine, root: str, step: int, write_own: Callable[[str], None], keep: int, cfg=None,
         optimizer_kind: Optional[str] = None, protect: tuple = ()) -> str:
    """Write on every rank under ``<tag>.tmp``: DeepSpeed's files, then ``write_own(tmp_dir)``
    (this rank's megaclip files, named ``rankRRRRR.pt``; each rank fsyncs its own), then mark
    complete and rename (rank 0). Keeps the ``keep`` newest complete checkpoints, and those
    named in ``protect`` whatever their age."""
    me = rank()
    tag = tag_for(step)
    tmp = os.path.join(root, tag + TMP_SUFFIX)
    engine.save_checkpoint(root, tag=tag + TMP_SUFFIX, client_state={}, save_latest=False)
    write_own(tmp)
    _fsync_files(tmp, lambda name: _rank_of_file(name) == me)
    barrier()  # every rank's files are written and on disk
    on_rank0(_finish_save, root, tag, step, optimizer_kind, keep, cfg, tuple(protect))
    return os.path.join(root, tag)


def choose_resume(root: str, resume: Optional[str]) -> Optional[str]:
    """The checkpoint directory to resume from, chosen by rank 0 (``auto``: the newest complete
    one under ``root``; or the path given) and checked by every rank: one that does not see it
    complete, or sees another step, is an error naming the ranks. Runs after
    ``prepare_output``."""
    ws = world()[1]
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
    if resume in (None, "", "none"):  # a fresh start (prepare_output refused one over checkpoints)
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


def _to_universal(tag_dir: str, scratch: str, timeout_s: float) -> tuple[str, str]:
    """DeepSpeed's universal checkpoint of ``tag_dir`` (per-parameter fp32 weights and optimiser
    states, loadable at any world size), written by rank 0 under ``scratch`` and shared (a
    failure is every rank's error); returns (its path, the result file to remove once every
    rank has read it).

    The conversion can take longer than a collective may wait (the process group's timeout,
    ``train.dist_timeout_min``), so the other ranks do not wait in one: rank 0 writes the
    outcome to a result file named for this attempt, and they poll for it for up to
    ``timeout_s`` (``train.universal_conversion_timeout_min``)."""
    import uuid
    out = os.path.join(scratch, os.path.basename(tag_dir) + ".universal" + TMP_SUFFIX)
    attempt = on_rank0(lambda: uuid.uuid4().hex)  # a stale result file is never read
    result_file = f"{out}.{attempt}.result.json"
    if rank() == 0:
        try:
            result = {"ok": _convert_universal(tag_dir, scratch, out)}
        except BaseException as e:
            if world()[1] > 1:
                _write_result(result_file, {"error": type(e).__name__, "message": str(e)})
            raise
        if world()[1] > 1:
            _write_result(result_file, result)
    else:
        result = _wait_for_result(result_file, timeout_s, tag_dir)
    if "ok" in result:
        return result["ok"], result_file
    cls = {"UserError": UserError, "FatalError": FatalError}.get(result["error"], RuntimeError)
    raise cls(result["message"] if cls is not RuntimeError
              else f"on rank 0: {result['error']}: {result['message']}")


def _write_result(path: str, result: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _wait_for_result(path: str, timeout_s: float, tag_dir: str) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise FatalError(f"rank 0 did not finish converting {tag_dir} to a universal "
                             f"checkpoint (to resume at another world size) within "
                             f"{timeout_s / 60:g} minutes (train.universal_conversion_timeout_"
                             f"min), or its result {path} is not visible on this node")
        time.sleep(min(2.0, max(0.05, timeout_s / 100)))


def _convert_universal(tag_dir: str, scratch: str, out: str) -> str:
    import subprocess
    import sys
    delay = float(os.environ.get(CONVERSION_DELAY_ENV) or 0)
    if delay:  # tests only: a conversion slower than the process group's timeout
        time.sleep(delay)
    os.makedirs(scratch, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    workers = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
    env = weights_only_env()  # and megaclip importable wherever the run was started from
    env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT] + [p for p in [env.get("PYTHONPATH")]
                                                          if p])
    proc = subprocess.run([sys.executable, "-m", "megaclip.checkpoint.to_universal",
                           "--input_folder", tag_dir, "--output_folder", out,
                           "--num_extract_workers", workers, "--num_merge_workers", workers],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        refused = [line[len("error: "):] for line in proc.stderr.splitlines()
                   if line.startswith("error: ")]
        if proc.returncode == 2 and refused:
            raise UserError(refused[-1])
        raise FatalError(f"converting {tag_dir} to a universal checkpoint (to resume at another "
                         f"world size) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return out


def load(engine, tag_dir: str, scratch: str, conversion_timeout_s: Optional[float] = None
         ) -> dict:
    """Restore model, optimiser and fp32 master shards; returns DeepSpeed's client state (empty
    since megaclip keeps its own, ``train_state.py``). A checkpoint written at another world size
    goes through DeepSpeed's universal format, converted under ``scratch`` (the run's own
    checkpoint folder; the source is only read) by rank 0 while the others wait up to
    ``conversion_timeout_s`` (None: 6 hours)."""
    check_files(tag_dir)  # a crafted file is every rank's error, before DeepSpeed reads any
    ws = world()[1]
    saved_ws = saved_world_size(tag_dir)
    source, universal = tag_dir, None
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    # DeepSpeed's universal load gives every parameter group the hyperparameters of the first
    # (weight decay included, so the no-decay group would be decayed); ours come from the config.
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    if saved_ws != ws:
        source = universal = _to_universal(tag_dir, scratch, conversion_timeout_s or 6 * 3600)[0]
        engine._config.load_universal_checkpoint = True
    try:
        with weights_only_loads():
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
        # The universal checkpoint has the optimiser's parameters only: locked ones come back
        # from the model-states files.
        restore_frozen(engine.module, tag_dir, saved_ws)
    else:  # torch's load_state_dict takes the checkpoint's group settings: the layer-decay
        for group, kept in zip(inner.param_groups, groups):  # scales are the config's
            if "lr_scale" in kept:
                group["lr_scale"] = kept["lr_scale"]
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    if universal is not None:
        barrier()  # every rank has read the conversion and its result file
        if rank() == 0:
            shutil.rmtree(universal, ignore_errors=True)
            for name in os.listdir(scratch):
                if name.startswith(os.path.basename(universal) + ".") and name.endswith(
                        (".result.json", ".result.json.tmp")):
                    os.remove(os.path.join(scratch, name))
    return ds_client


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


def consolidate(tag_dir: str, keep=None) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a checkpoint, from every rank's master shards
    (DeepSpeed's own zero_to_fp32 reader; runs on one CPU process, any ZeRO stage). With
    ``keep`` (a predicate on names) only those tensors are built: the shards are read lazily,
    so memory holds at most one copy of what is kept."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    tag_dir = os.path.abspath(tag_dir.rstrip("/"))
    if not os.path.isfile(os.path.join(tag_dir, MARKER)):
        raise UserError(f"'{tag_dir}' is not a complete megaclip checkpoint directory")
    with weights_only_loads():
        if keep is None:
            state = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(tag_dir),
                                                             tag=os.path.basename(tag_dir))
            return {k: v.float() for k, v in state.items()}
        lazy = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(tag_dir),
                                                        tag=os.path.basename(tag_dir),
                                                        lazy_mode=True)
        return {k: v.contiguous().float() for k, v in lazy.items() if keep(k)}
