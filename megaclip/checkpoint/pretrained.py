"""Reading a pretrained open_clip or timm file (``model.init_from``): where it is, its tensors
read weights-only, and the model config beside it.

Only local files: a URL or an ``hf-hub:`` name is refused by the config check (no network at run
time). ``.safetensors`` holds tensors only; ``.bin``/``.pt``/``.pth`` are unpickled weights-only
(``safe_load.py``): a file whose pickle names anything else is refused, exit 2, and nothing in
it runs. TorchScript archives (OpenAI's original ``.pt`` files) are programs and are refused too.
"""
from __future__ import annotations

import json
import os
import pickle
from typing import Optional

import torch

from megaclip.checkpoint.safe_load import refusal
from megaclip.errors import UserError

# In a folder, the first of these that exists (open_clip's and timm's Hugging Face files).
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                "pytorch_model.bin")
SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# The model config beside the weights: open_clip's Hugging Face folders, timm's.
CONFIG_FILES = ("open_clip_config.json", "config.json")
MAX_CONFIG_BYTES = 1 << 20


def locate(path: str) -> str:
    """The weights file ``model.init_from`` names: the file itself, or in a folder the first of
    ``WEIGHT_FILES``."""
    if not os.path.exists(path):
        raise UserError(f"model.init_from: {path} does not exist")
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise UserError(f"model.init_from: the folder {path} holds none of "
                        f"{', '.join(WEIGHT_FILES)}")
    if not path.endswith(SUFFIXES):
        raise UserError(f"model.init_from: {path} is not a {', '.join(SUFFIXES)} file")
    return path


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The file's tensors by name (weights-only), on the CPU. A training checkpoint's
    ``state_dict`` (open_clip's ``epoch_N.pt``, timm's) is taken, without its ``module.``
    prefix."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            state = load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001 - a cut or foreign file
            raise UserError(f"model.init_from: cannot read {path} as safetensors "
                            f"({type(e).__name__}: {e})") from None
    else:
        state = _torch_load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise UserError(f"model.init_from: {path} holds no state dict (a mapping of tensors)")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and torch.is_tensor(v)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    if not tensors:
        raise UserError(f"model.init_from: {path} holds no tensors")
    return tensors


def _torch_load(path: str):
    for mmap in (True, False):  # mapped: the tensors stay on disk until copied
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise refusal(path, e) from None
        except RuntimeError as e:
            text = str(e)
            if "mmap can only be used" in text and mmap:
                continue  # torch's older (not zip) format: read without mapping
            if "TorchScript" in text:
                raise UserError(f"model.init_from: {path} is a TorchScript archive (a program, "
                                f"as OpenAI's original CLIP files are): megaclip does not run "
                                f"it; load it with open_clip once and save its state_dict"
                                ) from None
            raise UserError(f"model.init_from: cannot read {path} ({text.splitlines()[0]})"
                            ) from None
    raise AssertionError("unreachable")


def beside(path: str) -> Optional[tuple[str, dict]]:
    """(name, content) of the model config next to the weights file, if one is there: open_clip's
    ``open_clip_config.json``, timm's ``config.json``, or the ``megaclip_<preset>.json`` of
    megaclip's open_clip export."""
    folder = os.path.dirname(os.path.abspath(path))
    names = list(CONFIG_FILES) + sorted(n for n in os.listdir(folder)
                                        if n.startswith("megaclip_") and n.endswith(".json"))
    for name in names:
        full = os.path.join(folder, name)
        if not os.path.isfile(full) or os.path.getsize(full) > MAX_CONFIG_BYTES:
            continue
        try:
            with open(full) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            return name, data
    return None
