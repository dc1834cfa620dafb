"""Checkpoints: the one place that calls DeepSpeed's save/load. A checkpoint is complete once
every rank has written its files and rank 0 has written the COMPLETE marker."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import torch

from megaclip.distributed import barrier, world

MARKER = "COMPLETE"
_TAG = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _TAG.match(name)
        if m and os.path.isfile(os.path.join(root, name, MARKER)):
            out.append((int(m.group(1)), name))
    return sorted(out)


def latest_checkpoint(root: str) -> Optional[str]:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


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


def save(engine, root: str, step: int, client_state: dict, keep: int) -> str:
    """Save on every rank (each writes its own shards and client state), then mark complete."""
    tag = tag_for(step)
    engine.save_checkpoint(root, tag=tag, client_state=client_state)
    barrier()
    if world()[0] == 0:
        with open(os.path.join(root, tag, MARKER), "w") as f:
            json.dump({"step": step}, f)
        for _, old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    barrier()
    return os.path.join(root, tag)


def load(engine, root: str, tag: str) -> dict:
    """Restore model, optimiser and fp32 master shards; returns this rank's client state."""
    path, client = engine.load_checkpoint(root, tag=tag, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}")
    return client
