"""Everything a checkpoint holds besides DeepSpeed's files, saved and restored in one place.

Per rank: ``client/rankR.pt`` (step, samples seen, RNG, the data stream's position, the
non-finite step guard, the objective's buffers such as the distillation centres) and, with an
EMA teacher, ``teacher/rankR.pt`` (its fp32 shards, ``teacher/state.py``). Every key written is
read back on resume. Files are read weights-only (``safe_load.py``): plain containers and tensors.
Rank 0 adds ``tokenizer.json`` (the path and sha256 of the tokenizer the run trained with), so
that a resume or an export with another tokenizer file is refused instead of silently mixing
token ids (``check_tokenizer``).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Optional

import torch
from torch import nn

from megaclip.checkpoint import io
from megaclip.checkpoint.io import saved_world_size
from megaclip.checkpoint.safe_load import weights_only_loads
from megaclip.distributed import rank, world
from megaclip.errors import UserError
from megaclip.teacher.state import TEACHER_DIR, load_teacher, save_teacher, teacher_state

CLIENT_DIR = "client"
TOKENIZER_FILE = "tokenizer.json"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_record(path: str) -> dict:
    """What a checkpoint records of the tokenizer file at ``path``."""
    return {"path": os.path.abspath(path), "sha256": file_sha256(path)}


def check_tokenizer(tag_dir: str, path: str,
                    advice: str = "point data.tokenizer at the one it was trained with"
                    ) -> list[str]:
    """Refuse to use checkpoint ``tag_dir`` with the tokenizer file at ``path`` when its bytes
    differ from those the checkpoint was trained with (the same ids would mean other pieces);
    ``advice`` ends the message. Returns a warning for a checkpoint written before they
    recorded it (nothing to check)."""
    record_file = os.path.join(tag_dir, TOKENIZER_FILE)
    if not os.path.isfile(record_file):
        return [f"warning: {tag_dir} records no tokenizer (written before checkpoints did): "
                f"nothing checks that {path} is the one it was trained with"]
    with open(record_file) as f:
        saved = json.load(f)
    if not os.path.isfile(path):
        raise UserError(f"tokenizer {path} does not exist; {tag_dir} was trained with "
                        f"{saved['path']} (sha256 {saved['sha256']})")
    now = file_sha256(path)
    if now != saved["sha256"]:
        raise UserError(f"{tag_dir} was trained with tokenizer {saved['path']} (sha256 "
                        f"{saved['sha256']}), but {path} has sha256 {now}: another tokenizer "
                        f"(retrained or replaced?); {advice}")
    return []


def rng_state() -> dict:
    """The generators a rank draws from: the host's, Python's, and its own GPU's (only that
    one: a resume may see fewer GPUs per task, and the rank uses no other)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state``'s generators. Checkpoints written before held every visible GPU's
    state (a list): the rank's own device's entry is taken, or the first where the list is
    shorter (a task that now sees one GPU)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda)


class TrainState:
    """The run's progress (``step``, ``samples_seen``) and the objects whose state a restart
    must carry: ``guard`` (``state_dict``/``load_state_dict``), ``objective`` (an ``nn.Module``)
    and ``teacher`` (an ``EmaTeacher`` or None). The data stream is built after the restore, from
    ``stream`` (its saved position, None for a fresh start); at save time its current state is
    given to ``save``. ``tokenizer``: its ``tokenizer_record``, written into every checkpoint
    (None: none recorded)."""

    def __init__(self, guard, objective: nn.Module, teacher=None,
                 tokenizer: Optional[dict] = None):
        self.step, self.samples_seen = 0, 0
        self.guard, self.objective, self.teacher = guard, objective, teacher
        self.tokenizer = tokenizer
        self.stream: Optional[dict] = None
        self.data_ended = ""  # why training ended when a data source ran out (or "")

    def client_state(self, stream_state: dict) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "rng": rng_state(),
                "data": stream_state, "data_ended": self.data_ended, **self.guard.state_dict(),
                "objective": {k: v.cpu() for k, v in self.objective.state_dict().items()}}

    def save(self, engine, root: str, stream_state: dict, keep: int, cfg,
             optimizer_kind: str) -> str:
        """A checkpoint of this step under ``root`` (every rank); returns its path. Retention
        keeps the checkpoint the guard protects."""
        client = self.client_state(stream_state)
        # A teacher whose terms have not started yet (start_at) is not initialised: none saved.
        saves_teacher = self.teacher is not None and self.teacher.initialised
        teacher = teacher_state(self.teacher) if saves_teacher else None

        def write_own(tmp: str) -> None:
            os.makedirs(os.path.join(tmp, CLIENT_DIR), exist_ok=True)
            torch.save(client, os.path.join(tmp, CLIENT_DIR, f"rank{rank():05d}.pt"))
            if saves_teacher:
                save_teacher(tmp, self.teacher, teacher)
            if self.tokenizer is not None and rank() == 0:  # fsynced with rank 0's files
                with open(os.path.join(tmp, TOKENIZER_FILE), "w") as f:
                    json.dump(self.tokenizer, f)

        return io.save(engine, root, self.step, write_own, keep, cfg, optimizer_kind,
                       protect=self.guard.protected)

    def restore(self, engine, tag_dir: str, scratch: str,
                conversion_timeout_s: Optional[float] = None) -> None:
        """Load ``tag_dir`` into the engine (``io.load``; a world-size change goes through
        DeepSpeed's universal checkpoint under ``scratch``, which the other ranks wait up to
        ``conversion_timeout_s`` for) and into this state. At another world size every rank
        takes rank 0's client state without its RNG."""
        with weights_only_loads():  # a refused file is an error naming it
            ds_client = io.load(engine, tag_dir, scratch, conversion_timeout_s)
            me, ws = rank(), world()[1]
            same_world = saved_world_size(tag_dir) == ws
            own = os.path.join(tag_dir, CLIENT_DIR, f"rank{me if same_world else 0:05d}.pt")
            if os.path.isfile(own):
                client = torch.load(own, map_location="cpu", weights_only=True)
                if not same_world:
                    client.pop("rng", None)  # rank 0's generator state is not every rank's
            else:
                client = ds_client  # written before megaclip kept its client state apart
            # A teacher built uninitialised (its terms start late) takes the checkpoint's EMA
            # if it has one; a checkpoint written before their start has none, and the trainer
            # initialises the teacher from the student at the start step.
            if self.teacher is not None and (self.teacher.initialised
                                             or os.path.isdir(os.path.join(tag_dir, TEACHER_DIR))):
                load_teacher(tag_dir, self.teacher)
        self.step, self.samples_seen = client["step"], client["samples_seen"]
        self.guard.load_state_dict(client)
        self.objective.load_state_dict(client.get("objective", {}))
        if "rng" in client:
            set_rng_state(client["rng"])
        self.stream = client["data"]
        self.data_ended = client.get("data_ended", "")
