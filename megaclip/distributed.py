"""Small collective helpers that work on NCCL (GPU) and gloo (CPU) alike."""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
    if world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (no gradient); equal shapes required."""
    if world()[1] == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world()[1])]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(x)
    return x


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def default_env() -> None:
    """Let ``python megaclip/train.py`` run as a single process without a launcher: fill the
    torch.distributed env:// variables when no launcher (deepspeed, torchrun, srun) set them."""
    import os
    if "RANK" in os.environ:
        return
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
