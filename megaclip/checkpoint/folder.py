"""The checkpoint folder of a run (``<output_dir>/checkpoints``): how its entries are named, which
of them are complete, and what keeps them from being lost.

``stepN`` is a complete checkpoint (its ``COMPLETE`` marker is whole: written, fsynced, then
renamed into place); ``stepN.tmp`` one being written; ``stepN.replaced`` and ``stepN.delete``
old copies on their way out; ``aside-<time>/`` checkpoints (and the run's ``eval_stepN.json``)
moved out of the way by a resume from an older one; ``MOVING_ASIDE`` the intent of such a move;
``stepN.aside-<time>`` a folder named like a checkpoint but without a marker, which a save of
step N found in its way (megaclip never deletes what it did not write); ``LOCK`` held by the
run's rank 0. Every rename is made so that a crash at any point leaves either the old or the new
state, which ``clean_interrupted`` finishes or undoes at the next start.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import stat
import time
from typing import Optional

from megaclip.errors import UserError

MARKER = "COMPLETE"
TMP_SUFFIX = ".tmp"
_REPLACED = ".replaced"  # a complete checkpoint a save of the same step is replacing
_DELETE = ".delete"  # a checkpoint retention is removing
_MOVE_INTENT = "MOVING_ASIDE"  # while newer checkpoints are moved aside: the step they follow
_LOCK = "LOCK"
_TAG = re.compile(r"^step(\d+)$")
_EVAL = re.compile(r"^eval_step(\d+)\.json$")  # the trainer's results, in the run's output dir
log = logging.getLogger("megaclip")


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


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_interrupted(root: str) -> list[str]:
    """Finish or undo what interrupted writes left under ``root``; returns what it did, one line
    each. A ``<tag>.tmp`` with its marker was complete but not yet renamed: it becomes ``<tag>``
    (unless a complete ``<tag>`` exists). One without is removed, as are ``<tag>.replaced`` (the
    copy a save of the same step was replacing: put back if the new one never arrived) and
    ``<tag>.delete`` (retention's). A ``<tag>`` directory without a marker is left alone and
    named: megaclip never writes one (moved aside, never deleted, where a checkpoint of that
    step must take its name). Rank 0 only (``on_rank0``), before anything else."""
    if not os.path.isdir(root):
        return []
    done = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        base = name.rsplit(".", 1)[0]
        final = os.path.join(root, base)
        if name.endswith(TMP_SUFFIX) and _TAG.match(base) and is_complete(path) and \
                marker(path)["step"] == int(_TAG.match(base).group(1)) and \
                not _is_checkpoint_dir(final):
            if os.path.lexists(final):  # not megaclip's: kept, out of the way
                done.append(f"moved {base} aside to {os.path.basename(set_aside(final))}: no "
                            f"{MARKER} marker, not a checkpoint megaclip wrote")
            os.rename(path, final)
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
                if os.path.lexists(os.path.join(root, base)):  # not megaclip's: kept
                    done.append(f"moved {base} aside to "
                                f"{os.path.basename(set_aside(os.path.join(root, base)))}: no "
                                f"{MARKER} marker, not a checkpoint megaclip wrote")
                os.rename(path, os.path.join(root, base))
                done.append(f"restored {base}: the save that was replacing it was interrupted")
        elif _TAG.match(name) and os.path.isdir(path) and not is_complete(path):
            done.append(f"ignored {name}: no {MARKER} marker, not a checkpoint megaclip wrote")
    intent = os.path.join(root, _MOVE_INTENT)
    if os.path.isfile(intent):  # a resume from an older checkpoint was moving newer ones aside
        with open(intent) as f:
            moving = json.load(f)
        after = moving["after_step"]
        done += [f"moved {p} aside: finishing the move of an interrupted resume from step "
                 f"{after}" for p in move_aside(root, after, moving.get("eval_dir"))]
        if os.path.exists(intent):
            os.remove(intent)
    for name in os.listdir(root):
        if name.endswith(".partial"):
            os.remove(os.path.join(root, name))
    fsync_dir(root)
    return done


def _is_checkpoint_dir(path: str) -> bool:
    """A complete checkpoint directory itself (a link to one is not: replacing it would follow
    the link)."""
    return os.path.isdir(path) and not os.path.islink(path) and is_complete(path)


def set_aside(path: str) -> str:
    """Rename ``path`` (anything megaclip will not delete) to ``<path>.aside-<time>[-n]`` beside
    it; returns the new name."""
    stem = f"{path}.aside-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = stem, 1
    while os.path.lexists(aside):
        aside, n = f"{stem}-{n}", n + 1
    os.rename(path, aside)
    return aside


def newer_evals(eval_dir: Optional[str], after_step: int) -> list[str]:
    """The ``eval_stepN.json`` files of ``eval_dir`` with N > ``after_step``, oldest first."""
    if not eval_dir or not os.path.isdir(eval_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(eval_dir)
             for m in [_EVAL.match(name)] if m and int(m.group(1)) > after_step]
    return [name for _, name in sorted(found)]


def move_aside(root: str, after_step: int, eval_dir: Optional[str] = None) -> list[str]:
    """Move the complete checkpoints of ``root`` newer than ``after_step``, and the
    ``eval_stepN.json`` results of ``eval_dir`` (the run's output dir) newer than it, into
    ``root/aside-<time>[-n]/`` (a resume from an older one must neither overwrite nor delete
    them, nor mix their results with its own); returns where they went. An intent file names
    ``after_step`` while they move, so a move cut short is finished at the next start
    (``clean_interrupted``) before anything picks one of them to resume from."""
    newer = [tag for step, tag in complete_checkpoints(root) if step > after_step]
    evals = newer_evals(eval_dir, after_step)
    if not newer and not evals:
        return []
    intent = os.path.join(root, _MOVE_INTENT)
    write_json(intent, {"after_step": after_step,
                        "eval_dir": os.path.abspath(eval_dir) if eval_dir else None})
    stem = os.path.join(root, time.strftime("aside-%Y%m%d-%H%M%S"))
    aside, n = stem, 1
    while os.path.exists(aside):
        aside, n = f"{stem}-{n}", n + 1
    os.makedirs(aside)
    for tag in newer:
        os.rename(os.path.join(root, tag), os.path.join(aside, tag))
    for name in evals:  # a copy, then the removal, where the output dir is another file system
        shutil.move(os.path.join(eval_dir, name), os.path.join(aside, name))
    if evals:
        fsync_dir(aside)
        fsync_dir(eval_dir)
    fsync_dir(root)
    os.remove(intent)
    fsync_dir(root)
    return [os.path.join(aside, name) for name in newer + evals]


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
    try:  # never through a link: the truncation below would hit whatever it points to
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link; the lock of a checkpoint folder is a "
                            f"plain file megaclip creates: remove the link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path} is not a plain file; the lock of a checkpoint folder is one "
                        f"megaclip creates: remove it")
    f = os.fdopen(fd, "r+")
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


def write_json(path: str, content: dict, indent: Optional[int] = None) -> None:
    """``content`` as JSON at ``path``, whole or absent: written aside, fsynced, renamed (a
    reader never sees half a file, a crash never leaves one)."""
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(content, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())
    os.rename(partial, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_marker(tmp: str, content: dict) -> None:
    """The ``COMPLETE`` marker of ``tmp``, whole or absent."""
    write_json(os.path.join(tmp, MARKER), content)


def publish(root: str, tag: str, keep: int, protect: tuple = ()) -> list[str]:
    """Rename the marked ``<tag>.tmp`` to ``<tag>`` (a save of a step already saved moves the old
    copy out of the way first, so one of the two is always there), then keep the ``keep`` newest
    complete checkpoints and those in ``protect`` (each old one renamed before it is removed).
    Whatever else sits at ``<tag>`` (a folder without a marker, a file, a link) is not megaclip's
    to delete: it is moved aside (``set_aside``), logged, and named in the notes returned."""
    tmp, final = os.path.join(root, tag + TMP_SUFFIX), os.path.join(root, tag)
    replaced = final + _REPLACED
    notes = []
    if _is_checkpoint_dir(final):
        os.rename(final, replaced)
    elif os.path.lexists(final):
        aside = set_aside(final)
        notes.append(f"moved {final} aside to {aside}: no {MARKER} marker, not a checkpoint "
                     f"megaclip wrote, and a save of the same step needs its name")
        log.warning(notes[-1])
    os.rename(tmp, final)
    fsync_dir(root)
    if os.path.isdir(replaced):
        shutil.rmtree(replaced)
    old = complete_checkpoints(root)[:-keep] if keep > 0 else []
    for _, name in old:
        if name not in protect:
            gone = os.path.join(root, name + _DELETE)
            os.rename(os.path.join(root, name), gone)
            shutil.rmtree(gone, ignore_errors=True)
    fsync_dir(root)
    return notes
