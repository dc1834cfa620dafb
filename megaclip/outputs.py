"""What the tools write (``--out``): never over a user's files by surprise, never stale files
beside new ones.

An output that exists (a non-empty folder, a file) is refused unless ``--force``. The new output
is written under a temporary name beside it and renamed into place when whole; with ``--force``
the old one is renamed aside first and removed only once the new one is in place, so a failed
run leaves the old output as it was (and at worst a ``<name>.partial-*`` to delete).
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import Iterable, Iterator

from megaclip.errors import UserError


def _holds(folder: str, path: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (both resolved)."""
    folder, path = os.path.realpath(folder), os.path.realpath(path)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out(paths: Iterable[str], force: bool, flag: str = "--out",
              inputs: Iterable[str] = (), folder: bool = True) -> None:
    """Refuse (exit 2, naming it) an output path that exists: a folder with anything in it, or a
    file, unless ``force``; one of the other kind (a file where the output is a ``folder``, or
    the reverse) always. Even with ``force``, a folder that holds one of ``inputs``, the
    current directory or the home directory is refused: replacing it would delete them."""
    for path in paths:
        if not os.path.lexists(path):
            continue
        is_dir = os.path.isdir(path)
        if is_dir != folder:
            raise UserError(f"{flag} {path} is a {'file' if folder else 'folder'}; give "
                            f"{'a folder' if folder else 'the path of a file'}")
        if is_dir and not os.listdir(path):
            continue  # an empty folder: nothing to lose
        if not force:
            what = "folder is not empty" if is_dir else "file exists"
            raise UserError(f"{flag} {path}: the {what}; choose a new one, or give --force to "
                            f"replace it whole")
        for kept in [*inputs, os.getcwd(), os.path.expanduser("~")]:
            if kept and is_dir and _holds(path, kept):
                raise UserError(f"{flag} {path} --force would delete {kept} with it; choose "
                                f"another {flag}")


def _free_name(stem: str) -> str:
    name, n = stem, 1
    while os.path.lexists(name):
        name, n = f"{stem}-{n}", n + 1
    return name


def partial_beside(path: str) -> str:
    """A new empty folder ``<path>.partial-<pid>[-n]`` beside ``path`` (so a rename moves it
    into place), made with the usual permissions."""
    real = os.path.realpath(path)
    os.makedirs(os.path.dirname(real), exist_ok=True)
    while True:
        name = _free_name(f"{real}.partial-{os.getpid()}")
        try:
            os.mkdir(name)
            return name
        except FileExistsError:  # taken between the look and the make
            continue


def install(new: str, path: str) -> None:
    """Put ``new`` (beside ``path``, same file system) in place of ``path``: whatever is there is
    renamed aside, ``new`` renamed into place, then the old one removed (a file replacing a
    file: one atomic rename)."""
    real = os.path.realpath(path)  # a link to the output: its target is replaced
    if os.path.isfile(new) and not os.path.isdir(real):
        os.replace(new, real)  # a file for a file: one atomic step, no moment without either
        return
    old = None
    if os.path.lexists(real):
        old = _free_name(f"{real}.replaced-{os.getpid()}")
        os.rename(real, old)
    try:
        os.rename(new, real)
    except BaseException:
        if old is not None:
            os.rename(old, real)
        raise
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old)
        else:
            os.remove(old)


@contextmanager
def output_folder(path: str, force: bool, flag: str = "--out",
                  inputs: Iterable[str] = ()) -> Iterator[str]:
    """A temporary folder beside ``path`` to write the output into; on leaving the block without
    an error it replaces ``path`` (``install``), on an error it is removed. Checked first
    (``check_out``)."""
    check_out([path], force, flag, inputs)
    tmp = partial_beside(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    install(tmp, path)
