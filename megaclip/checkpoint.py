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

from megaclip.config import save_resolved
from megaclip.distributed import barrier, world
from megaclip.errors import UserError

MARKER = "COMPLETE"
CONFIG_FILE = "config.yaml"
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


def save(engine, root: str, step: int, client_state: dict, keep: int, cfg=None) -> str:
    """Save on every rank (each writes its own shards and client state), then mark complete.
    The resolved config is written beside the shards so tools can rebuild the model."""
    tag = tag_for(step)
    engine.save_checkpoint(root, tag=tag, client_state=client_state)
    barrier()
    if world()[0] == 0:
        if cfg is not None:
            save_resolved(cfg, os.path.join(root, tag, CONFIG_FILE))
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


def consolidate(tag_dir: str) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a checkpoint, from every rank's master shards
    (DeepSpeed's own zero_to_fp32 reader; runs on one CPU process, any ZeRO stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    tag_dir = os.path.abspath(tag_dir.rstrip("/"))
    if not os.path.isfile(os.path.join(tag_dir, MARKER)):
        raise UserError(f"'{tag_dir}' is not a complete megaclip checkpoint directory")
    state = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(tag_dir),
                                                     tag=os.path.basename(tag_dir))
    return {k: v.float() for k, v in state.items()}


def checkpoint_config(tag_dir: str):
    """The resolved config a checkpoint was trained with."""
    from megaclip.config import config_from_dict
    import yaml
    path = os.path.join(tag_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f"'{tag_dir}' has no {CONFIG_FILE}; is it a megaclip checkpoint?")
    with open(path) as f:
        return config_from_dict(yaml.safe_load(f))


def load_for_inference(tag_dir: str):
    """(model in eval mode with fp32 weights, resolved config) from a checkpoint directory."""
    from megaclip.models import build_model
    cfg = checkpoint_config(tag_dir)
    model = build_model(cfg.model, cfg.objective, seed=0)
    missing, unexpected = model.load_state_dict(consolidate(tag_dir), strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {tag_dir} does not match its config: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    return model.eval(), cfg
