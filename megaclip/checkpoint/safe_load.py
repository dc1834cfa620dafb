"""Every checkpoint file megaclip reads is unpickled weights-only, DeepSpeed's included.

DeepSpeed 0.19.8 reads its own files with ``torch.load(..., weights_only=False)``: a crafted
file would run whatever its pickle names. Inside ``weights_only_loads()`` torch is told to load
weights-only whatever its caller asks (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, read by torch at each
call; a child process started there inherits it), the few DeepSpeed classes its checkpoints hold
are allowed, and a file that names anything else is a ``UserError`` naming the file.
"""
from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re

import torch

from megaclip.errors import UserError

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # torch refuses both set


def deepspeed_classes() -> list:
    """What DeepSpeed pickles besides tensors and containers, in the optimiser files of fp32 and
    bf16 ZeRO-1/2/3 and in its universal checkpoints: plain values, rebuilt without a call
    into DeepSpeed's code (an int enum from its value; a dataclass and a plain object from
    their ``__dict__``)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum,  # the ZeRO stage the optimiser state was written at
            LossScaler,  # the static loss scale of a bf16 or fp32 run (cur_scale: 1.0)
            fragment_address]  # ZeRO-1/2: (numel, start) of each parameter in the flat shard


def allow_deepspeed_classes() -> None:
    torch.serialization.add_safe_globals(deepspeed_classes())


def _name(f) -> str:
    return os.fspath(f) if isinstance(f, (str, os.PathLike)) else repr(f)


def refusal(path, error: BaseException) -> UserError:
    """The error for a file weights-only loading refused, naming the file and what it holds."""
    text = str(error)
    found = re.search(r"GLOBAL [\w.]+", text) or re.search(r"Unsupported [^\n.]+", text)
    what = found.group(0) if found else "something besides tensors and plain containers"
    return UserError(f"checkpoint file {_name(path)} holds objects megaclip does not load "
                     f"({what}): refusing to run code from it")


def _naming(load):
    """``torch.load`` whose refusal names the file it was reading."""
    @functools.wraps(load)
    def named_load(f, *args, **kwargs):
        try:
            return load(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise refusal(f, e) from None
        except RuntimeError as e:  # a pickle outside torch's zip format, asked for mapped
            if "mmap can only be used" not in str(e):
                raise
            raise UserError(f"checkpoint file {_name(f)} is not in torch's zip format "
                            f"(DeepSpeed writes no other): refusing to read it") from None
    return named_load


def weights_only_env(env=None) -> dict:
    """A child process's environment in which every ``torch.load`` is weights-only."""
    out = {k: v for k, v in (os.environ if env is None else env).items() if k != _FORCE_NO}
    out[FORCE] = "1"
    return out


@contextlib.contextmanager
def weights_only_loads():
    """Within: every ``torch.load`` of this process (and of a child it starts) is weights-only,
    with DeepSpeed's few classes allowed; a refused file is a ``UserError`` naming it."""
    allow_deepspeed_classes()
    saved = {k: os.environ.get(k) for k in (FORCE, _FORCE_NO)}
    load = torch.load
    os.environ.pop(_FORCE_NO, None)
    os.environ[FORCE] = "1"
    torch.load = _naming(load)
    try:
        yield
    finally:
        torch.load = load
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_files(tag_dir: str) -> None:
    """Every ``*.pt`` file of a checkpoint read weights-only and mapped (the pickles parsed, the
    tensors left on disk), the files shared out among the ranks, and any refusal every rank's
    error: DeepSpeed would meet a crafted file on one rank while the others wait for it in a
    collective. Every rank calls it."""
    import torch.distributed as dist

    from megaclip.distributed import barrier, rank_device, world
    me, ws = world()
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(tag_dir) for n in names
                   if n.endswith(".pt"))
    mine = next((i for i in range(me, len(files), ws) if _refused(files[i])), len(files))
    first = torch.tensor([mine], dtype=torch.int64, device=rank_device())
    if ws > 1:  # the first refused file of any rank: its name is enough to say why
        work = dist.all_reduce(first, op=dist.ReduceOp.MIN, async_op=True)
        work.wait()
        barrier()
        _EXCHANGED[:] = [first, work]
    index = int(first.item())
    if index < len(files):
        raise UserError(_refused(files[index]) or f"checkpoint file {files[index]} cannot be "
                        f"read on another rank")


# The exchange's tensor and work, held past a barrier and to the end: released by a gloo worker
# thread while the process exits on the error just raised, a tensor Python made takes the
# interpreter down with it ("terminate called without an active exception", SIGABRT instead of
# exit code 2).
_EXCHANGED: list = []


def _refused(path: str):
    """Why ``path`` cannot be loaded weights-only, or None."""
    with weights_only_loads():
        try:
            torch.load(path, map_location="cpu", mmap=True)
        except UserError as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - cut short, unreadable: every rank must hear
            first = (str(e).strip().splitlines() or [""])[0][:300]
            return f"checkpoint file {path} cannot be read ({type(e).__name__}: {first})"
    return None
