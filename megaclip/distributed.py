"""This rank's device, and small collective helpers that work on NCCL (GPU) and gloo (CPU) alike.

Every collective needs its tensors on the rank's device (NCCL raises on a host tensor), so the
device is chosen once, first, by ``setup_device``, and every helper here checks it.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist

from megaclip.errors import UserError
from megaclip.install import gpus_unseen_error

_DEVICE = torch.device("cpu")
# torch.distributed functions that take tensors; MEGACLIP_CHECK_COLLECTIVES=1 wraps them all.
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                "reduce_scatter_tensor", "broadcast", "reduce", "all_to_all", "all_to_all_single",
                "gather", "scatter", "send", "recv", "isend", "irecv", "all_reduce_coalesced",
                "_all_gather_base", "_reduce_scatter_base")


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank() -> int:
    """This process's rank; 0 when torch.distributed is not initialised."""
    return world()[0]


def rank_device() -> torch.device:
    """The device ``setup_device`` chose for this rank (the CPU before it is called)."""
    return _DEVICE


def setup_device(accelerator=None, slurm_task: bool = False) -> torch.device:
    """Choose and select this rank's device; call it before any model, tensor or data worker
    exists. With GPUs it is ``cuda:LOCAL_RANK`` (LOCAL_RANK from the deepspeed launcher, torchrun
    or, through ``cluster.setup_from_slurm``, srun). An srun task (``slurm_task``) that sees a
    single GPU (``--gpus-per-task=1``) uses it whatever its local rank, and LOCAL_RANK becomes 0
    so that DeepSpeed, which reads LOCAL_RANK, places its partitions there too."""
    global _DEVICE
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator
        accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        unseen = gpus_unseen_error(torch.version.cuda)
        if unseen:
            raise UserError(unseen)
        _DEVICE = torch.device("cpu")
    else:
        local, visible = int(os.environ.get("LOCAL_RANK", "0")), accelerator.device_count()
        if slurm_task and visible == 1 and local > 0:
            local = 0
            os.environ["LOCAL_RANK"] = "0"
        elif local >= visible:
            raise UserError(f"LOCAL_RANK is {local} but this task sees {visible} "
                            f"{accelerator.device_name()} device(s): start at most one task per "
                            f"device on each node")
        accelerator.set_device(local)
        _DEVICE = torch.device(accelerator.device_name(local))
    if os.environ.get("MEGACLIP_CHECK_COLLECTIVES") == "1":
        check_collective_devices()
    return _DEVICE


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def on_rank_device(*tensors: torch.Tensor) -> None:
    """Raise unless every tensor lives on this rank's device (what NCCL requires)."""
    for t in _tensors(tensors):
        if t.device != _DEVICE:
            raise RuntimeError(f"a collective was handed a tensor on {t.device}, but this "
                               f"rank's device is {_DEVICE}")


def check_collective_devices() -> None:
    """Wrap every tensor collective of ``torch.distributed`` (megaclip's and DeepSpeed's, which
    look them up there) so that a tensor off the rank's device raises at the call, on gloo as on
    NCCL. Turned on by MEGACLIP_CHECK_COLLECTIVES=1 (the tests and tools/gpu_check.sh)."""
    for name in _COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None or getattr(fn, "_megaclip_checked", False):
            continue

        def checked(*args, __fn=fn, __name=name, **kwargs):
            try:
                on_rank_device(*args, *kwargs.values())
            except RuntimeError as e:
                raise RuntimeError(f"torch.distributed.{__name}: {e}") from None
            return __fn(*args, **kwargs)

        checked = functools.wraps(fn)(checked)
        checked._megaclip_checked = True
        setattr(dist, name, checked)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient for this rank's rows.

    torch.distributed.nn's all_gather emulates reduce-scatter with all-to-all off NCCL, which
    gloo lacks; here backward is a reduce-scatter on NCCL and an all-reduce + slice elsewhere.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, ws = world()
        ctx.rank, ctx.ws, ctx.n = rank, ws, x.shape[0]
        out = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            mine = torch.empty((ctx.n, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter(mine, list(grad.split(ctx.n)))
            return mine
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank (rank order) keeping the autograd path to each rank."""
    on_rank_device(x)
    if world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (no gradient); equal shapes required."""
    on_rank_device(x)
    if world()[1] == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world()[1])]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the ranks, in place."""
    on_rank_device(x)
    if world()[1] > 1:
        dist.all_reduce(x)
    return x


def barrier() -> None:
    if world()[1] > 1:
        if dist.get_backend() == "nccl":  # else NCCL guesses a device and may pick another
            dist.barrier(device_ids=[_DEVICE.index])
        else:
            dist.barrier()


def init_distributed(**kwargs) -> None:
    """``deepspeed.init_distributed``, then drop the names of DeepSpeed's CPU shared memory.

    With every rank on one node, DeepSpeed's CPU backend makes one 66 MB POSIX shared-memory
    buffer per rank (``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``) and
    never removes it: every run, and every killed run, leaves 66 MB per rank in /dev/shm (RAM)
    until the machine reboots, and a node that runs many jobs on other ports runs out of memory.
    DeepSpeed's init returns once this rank has mapped every other rank's buffer; after a barrier
    that holds on every rank, so each rank unlinks its own name and the mappings live on until
    the process exits, however it exits.
    """
    import deepspeed
    deepspeed.init_distributed(**kwargs)
    release_shared_memory_names()


def release_shared_memory_names() -> None:
    barrier()
    name = "/deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank())
    try:
        import _posixshmem
        _posixshmem.shm_unlink(name)
    except (ImportError, FileNotFoundError):  # no POSIX shm here, or no buffer (GPU, nodes > 1)
        pass


def on_rank0(fn, *args, **kwargs):
    """``fn`` run by rank 0 alone, its result (or its error) shared with every rank.

    Work only rank 0 does (file-system housekeeping, a conversion) must not leave the others
    waiting in a collective when it fails: every rank raises the same error, of the same class
    where it is megaclip's own (``UserError``, ``FatalError``), else a ``RuntimeError``."""
    from megaclip.errors import FatalError, UserError
    rank, ws = world()
    box: list = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except BaseException as e:  # shared (an interrupt too), then raised on rank 0 as it was
            if ws > 1:
                box[0] = ("error", type(e).__name__, str(e))
                dist.broadcast_object_list(box, src=0)
            raise
    if ws > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0][0] == "ok":
        return box[0][1]
    kind, message = box[0][1], box[0][2]
    cls = {"UserError": UserError, "FatalError": FatalError}.get(kind, RuntimeError)
    raise cls(message if cls is not RuntimeError else f"on rank 0: {kind}: {message}")


def default_env() -> None:
    """Let ``python megaclip/train.py`` run as a single process without a launcher: fill the
    torch.distributed env:// variables when no launcher (deepspeed, torchrun, srun) set them."""
    if "RANK" in os.environ:
        return
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
