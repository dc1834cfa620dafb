"""Shard lists, and reading one shard into raw samples with every way a shard can be bad named.

A shard is read strictly: a tar that ends without its end-of-archive blocks, inside a header or
inside a member, a corrupt header, two members with the same name, a missing file or a ``pipe:``
command that exits non-zero (at any point of its output) raise ``BadShard`` naming the shard and
the reason. The samples read before the failure have already been handed out; the caller decides
whether to go on with the next shard.

A shard may come from anyone, so reading one is bounded: only the members a sample needs are
read (the rest are passed over unread), a member or a sample over its byte cap is not read, a tar
extended header (pax, GNU long name) over ``MAX_EXTENDED_HEADER`` makes the shard bad before it
is read, a pax header is checked in linear time before Python's parser sees it (some Python
versions parse crafted ones in quadratic time, CVE-2024-6232), and a command (``pipe:`` or a URL)
that gives no data for ``stall_timeout_s`` is killed with everything it started.
"""
from __future__ import annotations

import ctypes
import os
import re
import select
import signal
import subprocess
import tarfile
import warnings
from typing import Iterator, Optional

import braceexpand
from webdataset.gopen import Pipe, gopen
from webdataset.tariterators import base_plus_ext

from megaclip.errors import UserError

MAX_EXTENDED_HEADER = 64 * 1024  # bytes of one pax or GNU long-name header
MAX_PAX_DIGITS = 256  # longest run of digits in a pax header (linear-time parse guard)
_EXTENDED_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                   tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_DIGITS = re.compile(rb"\d+")


class ShardError(UserError):
    """A shard list that cannot be used (no file matches, files missing at start...)."""


class BadShard(Exception):
    """One shard failed while being read; ``url`` and ``reason`` say which and why."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


def is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url) or url.startswith("file://")


def non_local(pattern: str) -> list[str]:
    """The shards of ``pattern`` (brace-expanded, '::'-joined) that are commands or URLs."""
    try:
        return [u for part in pattern.split("::") for u in braceexpand.braceexpand(part)
                if not is_local(u)]
    except Exception:  # noqa: BLE001 - unbalanced braces: judged as written
        return [pattern] if not is_local(pattern) else []


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def expand_shards(pattern: str) -> list[str]:
    """Expand brace patterns; several patterns may be joined with '::'. A pattern whose local
    files are all missing is an error; some missing is a warning, and they stay in the list (so
    the shard sequences, and a resume, do not change): reading them counts as a bad shard."""
    if not pattern:
        raise UserError("no shards given (data.train_shards / eval.shards is empty)")
    urls: list[str] = []
    try:
        for part in pattern.split("::"):
            urls.extend(braceexpand.braceexpand(part))
    except Exception as e:  # noqa: BLE001 - unbalanced braces and the like
        raise ShardError(f"shard pattern '{pattern}': {e}") from None
    missing = [_local_path(u) for u in urls if is_local(u) and not os.path.isfile(_local_path(u))]
    if missing and len(missing) == len(urls):
        raise ShardError(f"shard pattern '{pattern}' matches no file (first: {missing[0]})")
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        warnings.warn(f"{len(missing)} of {len(urls)} shards of '{pattern}' do not exist (read "
                      f"as bad shards): {shown}", stacklevel=2)
    return urls


def shard_list(pattern: str) -> list[str]:
    """``expand_shards`` run by rank 0 alone and shared with every rank, so a job of thousands of
    ranks asks the file system about each shard once, not once per rank."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return expand_shards(pattern)
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", expand_shards(pattern))
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, or they wait
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ShardError(value)
    return value


class _StrictHeader(tarfile.TarInfo):
    """tarfile takes a header cut short, a missing end-of-archive or a corrupt header after the
    first member for the end of the archive; for a shard they mean it is damaged."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # the zero block that ends an archive
            raise
        except tarfile.EmptyHeaderError:
            raise tarfile.ReadError(f"no end-of-archive marker (cut at byte {tar.offset})") from None
        except tarfile.TruncatedHeaderError:
            raise tarfile.ReadError(f"truncated inside a header at byte {tar.offset}") from None
        except tarfile.InvalidHeaderError as e:
            raise tarfile.ReadError(f"corrupt header at byte {tar.offset}: {e}") from None

    def _proc_member(self, tar):
        if self.type in _EXTENDED_TYPES:
            if self.size > MAX_EXTENDED_HEADER:
                raise tarfile.ReadError(f"extended header of {self.size} bytes at byte "
                                        f"{self.offset} (over {MAX_EXTENDED_HEADER})")
            if self.type in _PAX_TYPES:
                return self._proc_pax_checked(tar)
        return super()._proc_member(tar)

    def _proc_pax_checked(self, tar):
        """Python's pax parser searches its header with patterns that take quadratic time in a
        run of digits; the header is read here first, its runs checked in linear time, and then
        handed to the parser as if unread."""
        fileobj = tar.fileobj
        buf = fileobj.read(self._block(self.size))
        longest = max((len(m) for m in _DIGITS.findall(buf[:self.size])), default=0)
        if longest > MAX_PAX_DIGITS:
            raise tarfile.ReadError(f"pax header at byte {self.offset} holds a run of {longest} "
                                    f"digits (over {MAX_PAX_DIGITS})")
        tar.fileobj = _Replay(buf, fileobj)
        try:
            return super()._proc_member(tar)
        finally:
            tar.fileobj = fileobj


class _Replay:
    """A file whose first bytes were read already: they are served again, then the rest."""

    def __init__(self, head: bytes, rest):
        self.head, self.rest = head, rest

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            out, self.head = self.head + self.rest.read(), b""
            return out
        out, self.head = self.head[:size], self.head[size:]
        return out + (self.rest.read(size - len(out)) if len(out) < size else b"")

    def tell(self) -> int:
        return self.rest.tell() - len(self.head)


def _members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, extension, header) of each regular member of a sample; names and extensions that
    start with ``__`` (the reader's own keys, like ``__oversize__``) are ignored."""
    for info in tar:
        tar.members = []  # tarfile keeps every header it has read; a shard has thousands
        if not info.isreg():
            continue
        key, ext = base_plus_ext(info.name)
        if key is None or os.path.basename(info.name).startswith("__") or ext.startswith("__"):
            continue
        yield key, ext.lower(), info


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    data = tar.extractfile(info).read()
    if len(data) != info.size:
        raise tarfile.ReadError(f"member {info.name} cut short")
    return data


class _Command:
    """The output of a shard's command (``pipe:...``, or the curl/gsutil pipes webdataset opens
    for URLs), read to its end before its exit status is looked at: a command that fails the
    same way always gives the same samples, and one that exits non-zero is a bad shard whatever
    its output looked like."""

    def __init__(self, proc: subprocess.Popen, own_group: bool, stall_timeout_s: float = 0.0):
        self.proc, self.own_group, self.stall_timeout_s = proc, own_group, stall_timeout_s
        self.fd = proc.stdout.fileno()
        self.stalled = False

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all, with -1); EOF is b"". No data for ``stall_timeout_s``
        kills the command and raises ``TimeoutError``."""
        chunks, want = [], size if size >= 0 else float("inf")
        got = 0
        while got < want:
            if self.stall_timeout_s > 0:
                ready, _, _ = select.select([self.fd], [], [], self.stall_timeout_s)
                if not ready:
                    self.stalled = True
                    self.kill()
                    raise TimeoutError(f"no data for {self.stall_timeout_s:g} s "
                                       f"(data.shard_stall_timeout_s); the command was killed")
            chunk = os.read(self.fd, int(min(want - got, 1 << 20)))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def status(self) -> int:
        """Drain what is left of the output (the command is not cut off by SIGPIPE), then wait."""
        if not self.proc.stdout.closed:
            while self.read(1 << 20):
                pass
            self.proc.stdout.close()
        return self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                if self.own_group:  # the shell and whatever it started (curl, aws s3 cp...)
                    os.killpg(self.proc.pid, signal.SIGKILL)
                else:
                    self.proc.kill()
            except ProcessLookupError:
                pass
        if not self.proc.stdout.closed:
            self.proc.stdout.close()
        self.proc.wait()


def _die_with_parent() -> None:
    """In a command's child process: killed when the data worker that started it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _open(url: str, stall_timeout_s: float = 0.0):
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE,
                                start_new_session=True, preexec_fn=_die_with_parent)
        return _Command(proc, own_group=True, stall_timeout_s=stall_timeout_s)
    stream = gopen(_local_path(url))
    if isinstance(stream, Pipe):
        return _Command(stream.proc, own_group=False, stall_timeout_s=stall_timeout_s)
    return stream


def read_shard(url: str, max_member_bytes: int = 1 << 62, skip: int = 0,
               keys: Optional[frozenset] = None, max_sample_bytes: int = 1 << 62,
               stall_timeout_s: float = 0.0) -> Iterator[dict]:
    """Raw samples of one shard, ``{'__key__', '__url__', ext: bytes, ...}``, undecoded; the
    first ``skip`` samples are passed over. With ``keys``, only those extensions are read; the
    others are listed under ``'__unread__'``. A member over ``max_member_bytes``, or one that
    would take its sample's members over ``max_sample_bytes``, is not read; its sample lists it
    under ``'__oversize__'`` (and, for the second reason, ``'__sample_cap__'``). A command
    that gives no data for ``stall_timeout_s`` (0: no limit) is killed. Raises ``BadShard`` on
    any failure; for a command, a non-zero exit status is the reason given."""
    stream = None
    try:
        stream = _open(url, stall_timeout_s)
        yield from _samples(url, stream, max_member_bytes, skip, keys, max_sample_bytes)
        if isinstance(stream, _Command):
            status = stream.status()
            if status != 0:
                raise BadShard(url, f"command exited with status {status}")
        else:
            stream.close()
        stream = None
    except (BadShard, GeneratorExit):
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read a shard names the shard
        if isinstance(stream, _Command) and not stream.stalled:
            status = stream.status()
            stream = None
            if status != 0:
                raise BadShard(url, f"command exited with status {status}") from None
        raise BadShard(url, _reason(e)) from None
    finally:
        if isinstance(stream, _Command):  # abandoned part-way: stop the command
            stream.kill()
        elif stream is not None:
            stream.close()


def _samples(url: str, stream, max_member_bytes: int, skip: int,
             keys: Optional[frozenset] = None, max_sample_bytes: int = 1 << 62
             ) -> Iterator[dict]:
    tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictHeader)
    sample: dict = {}
    n = held = 0
    for key, ext, info in _members(tar):
        if sample and key != sample["__key__"]:  # the previous sample is complete
            if n >= skip:
                yield sample
            n += 1
            sample = {}
        if not sample:
            sample, held = {"__key__": key, "__url__": url}, 0
        if (ext in sample or ext in sample.get("__oversize__", ())
                or ext in sample.get("__unread__", ())):
            raise tarfile.ReadError(f"duplicate member {key}.{ext}")
        if keys is not None and ext not in keys:  # not needed: passed over unread
            sample.setdefault("__unread__", []).append(ext)
        elif info.size > max_member_bytes:  # passed over unread: memory stays bounded
            sample.setdefault("__oversize__", []).append(ext)
        elif held + info.size > max_sample_bytes:
            sample.setdefault("__oversize__", []).append(ext)
            sample.setdefault("__sample_cap__", []).append(ext)
        else:  # samples being skipped are not copied out of the stream
            sample[ext] = _read(tar, info) if n >= skip else None
            held += info.size
    if sample and n >= skip:
        yield sample


def _reason(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "file does not exist"
    text = str(e.args[0]) if e.args else str(e)
    return f"{type(e).__name__}: {text}"


def iter_shard(url: str, keys: Optional[frozenset] = None,
               max_member_bytes: int = 256 * 2**20) -> Iterator[dict]:
    """``read_shard`` for readers that need every shard whole (evaluation sets, tokenizer
    training), reading the members ``keys`` (all by default): a bad shard is a ``ShardError``
    naming it."""
    try:
        yield from read_shard(url, max_member_bytes, keys=keys)
    except BadShard as e:
        raise ShardError(f"cannot read shard {e.url}: {e.reason}") from None
