"""Where DeepSpeed's just-in-time ops (FusedAdam on a GPU, the shared-memory all-reduce on the CPU)
are compiled, so that a job killed mid-compile cannot hang every later one.

torch compiles an extension under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``,
on a cluster usually a shared network home) while holding ``<build dir>/lock``. Before torch 2.12
that lock is a file whose mere existence blocks, with no timeout: a compile killed by a time limit
or the out-of-memory killer leaves it behind and every later job on any node waits for ever. Newer
torch holds an advisory lock instead, which network file systems do not always honour.

So each node compiles in a folder of its own (``$TMPDIR/megaclip-ext-$USER``, or
``/tmp/megaclip-ext-$USER``), unless ``TORCH_EXTENSIONS_DIR`` is set; with a torch that uses
lock files, a lock older than ``STALE_LOCK_S`` is an error naming it, and a wait on a lock is
bounded by ``LOCK_WAIT_S``.
"""
from __future__ import annotations

import glob
import os
import stat
import time
from typing import Optional

from megaclip.errors import FatalError, UserError

STALE_LOCK_S = 20 * 60  # a FusedAdam compile takes 1-2 minutes
LOCK_WAIT_S = 20 * 60


def extensions_dir(environ) -> tuple[str, str]:
    """(folder, why): the user's TORCH_EXTENSIONS_DIR, else a node-local folder of this user's."""
    if environ.get("TORCH_EXTENSIONS_DIR"):
        return environ["TORCH_EXTENSIONS_DIR"], "TORCH_EXTENSIONS_DIR"
    user = environ.get("USER") or str(os.getuid())
    base = environ.get("TMPDIR") or "/tmp"
    return os.path.join(base, f"megaclip-ext-{user}"), "node-local"


def own_folder(path: str) -> None:
    """Create ``path`` (mode 700) or accept it only as this user's own real folder that no one
    else can write: a folder under /tmp planted by another user would let them swap in the
    compiled library this process loads."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() \
            or st.st_mode & 0o022:
        raise UserError(f"{path} (where DeepSpeed's ops would compile) is not a folder of yours "
                        f"that only you can write; remove it, or set TORCH_EXTENSIONS_DIR to one")


def stale_locks(root: str, max_age_s: float = STALE_LOCK_S, now: Optional[float] = None) -> list:
    """Lock files under ``root`` (one per extension's build folder) older than ``max_age_s``."""
    now = time.time() if now is None else now
    out = []
    for path in sorted(glob.glob(os.path.join(root, "*", "lock")) +
                       glob.glob(os.path.join(root, "*", "*", "lock"))):
        try:
            if now - os.path.getmtime(path) > max_age_s:
                out.append(path)
        except OSError:
            pass  # released meanwhile
    return out


def uses_lock_files() -> bool:
    """Whether this torch blocks on a lock file's existence (FileBaton) when it compiles."""
    import torch.utils.cpp_extension as ext
    return hasattr(ext, "FileBaton")


def bound_lock_wait(limit_s: float = LOCK_WAIT_S) -> None:
    """Make torch's FileBaton give up after ``limit_s`` with a message naming the lock."""
    from torch.utils.file_baton import FileBaton

    def wait(self) -> None:
        start = time.time()
        while os.path.exists(self.lock_file_path):
            if time.time() - start > limit_s:
                raise FatalError(
                    f"waited {limit_s:.0f} s for {self.lock_file_path}: another process compiles "
                    f"this extension, or one was killed while compiling it. If no job of yours "
                    f"is compiling on this node, remove it (rm {self.lock_file_path}) and start "
                    f"again")
            time.sleep(self.wait_seconds)

    FileBaton.wait = wait


def setup_extensions(environ=None) -> str:
    """Point TORCH_EXTENSIONS_DIR at a node-local folder (unless set) and refuse stale locks;
    call it before anything compiles. Returns a line for the log."""
    environ = os.environ if environ is None else environ
    root, why = extensions_dir(environ)
    if why == "node-local":
        own_folder(root)
    environ["TORCH_EXTENSIONS_DIR"] = root
    if not uses_lock_files():
        return f"ops compile in {root} ({why})"
    stale = stale_locks(root)
    if stale:
        raise UserError(f"stale compile lock(s), older than {STALE_LOCK_S // 60} minutes: "
                        f"{', '.join(stale)}. A compile was killed; if no job of yours is "
                        f"compiling on this node, remove them (rm {' '.join(stale)})")
    bound_lock_wait()
    return f"ops compile in {root} ({why}; lock waits bounded at {LOCK_WAIT_S // 60} minutes)"
