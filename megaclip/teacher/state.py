"""The EMA teacher's state in a checkpoint: each rank's fp32 shards (``teacher/rankR.pt``),
restored bit for bit at the same world size and re-cut at another (docs/methods.md §4)."""
from __future__ import annotations

import os

import torch

from megaclip.checkpoint.safe_load import weights_only_loads
from megaclip.distributed import world
from megaclip.errors import UserError

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


def teacher_state(teacher) -> dict[str, torch.Tensor]:
    """What ``save_teacher`` writes for this rank: its fp32 shards under ZeRO-3, the whole fp32
    EMA on rank 0 otherwise (joined from every rank's fragments at stages 1-2: a collective, so
    every rank calls this at the same point, before the checkpoint's files are written)."""
    if teacher.partitioned:
        return teacher.state_dict()
    if teacher.fragments is None and world()[0] != 0:
        return {}  # only rank 0 writes the whole EMA
    return teacher.whole_state_dict()


def save_teacher(tag_dir: str, teacher, state: dict[str, torch.Tensor]) -> None:
    """Every rank writes its fp32 shards (ZeRO-3); with whole parameters rank 0 writes the
    whole EMA. ``state``: ``teacher_state(teacher)``."""
    rank, ws = world()
    if not teacher.partitioned and rank != 0:
        return
    os.makedirs(os.path.join(tag_dir, TEACHER_DIR), exist_ok=True)
    shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p, _ in teacher.pairs}
    torch.save({"partitioned": teacher.partitioned, "world_size": ws, "rank": rank,
                "numel": teacher.full_numels(), "shape": shapes, "ema": state},
               os.path.join(tag_dir, TEACHER_DIR, f"rank{rank:05d}.pt"))


def consolidate_teacher(tag_dir: str) -> dict[str, torch.Tensor]:
    """The whole fp32 EMA teacher (names ``trunk.*``, ``head.*``) from a checkpoint's shards."""
    folder = os.path.join(tag_dir, TEACHER_DIR)
    files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if not files:
        raise UserError(f"checkpoint {tag_dir} holds no EMA teacher")
    with weights_only_loads():  # mapped, not read: memory holds the joined teacher only
        parts = [torch.load(os.path.join(folder, f), map_location="cpu", weights_only=True,
                            mmap=True) for f in files]
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
        with weights_only_loads():
            saved = torch.load(own, map_location="cpu", weights_only=True)
        if saved["partitioned"] and saved["world_size"] == ws:
            teacher.load_state_dict(saved["ema"])
            return
    full = consolidate_teacher(tag_dir)
    if teacher.partitioned:
        full = {k: shard_of(v, rank, ws) for k, v in full.items()}
    teacher.load_state_dict(full)
