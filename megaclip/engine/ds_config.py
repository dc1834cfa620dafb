"""The DeepSpeed JSON and the experiment config: one source of truth for shared settings."""
from __future__ import annotations

import copy
import json

import torch

from megaclip.config import TrainConfig
from megaclip.errors import UserError

# DeepSpeed key -> (TrainConfig field, value)
_SHARED = (("train_micro_batch_size_per_gpu", "micro_batch_size"),
           ("gradient_accumulation_steps", "grad_accum_steps"),
           ("gradient_clipping", "grad_clip"))


def load_ds_config(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"DeepSpeed config '{path}' does not exist") from None
    except json.JSONDecodeError as e:
        raise UserError(f"cannot parse DeepSpeed config {path}: {e}") from None


def merge_ds_config(ds: dict, train: TrainConfig, world_size: int, source: str = "DeepSpeed config"
                    ) -> dict:
    """Fill batch size, accumulation and clipping from the experiment config. A value the JSON
    also sets must agree (or be "auto"); optimiser and scheduler belong to the experiment file."""
    ds = copy.deepcopy(ds)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise UserError(f"{source} sets '{key}'; megaclip takes it from the experiment "
                            f"config's 'optim' section only: remove it from the JSON")
    for ds_key, ours in _SHARED:
        value = getattr(train, ours)
        theirs = ds.get(ds_key, "auto")
        if theirs != "auto" and float(theirs) != float(value):
            raise UserError(f"{source} sets {ds_key}={theirs} but the experiment config has "
                            f"train.{ours}={value}; set one of them (\"auto\" in the JSON defers)")
        ds[ds_key] = value
    total = train.micro_batch_size * train.grad_accum_steps * world_size
    theirs = ds.get("train_batch_size", "auto")
    if theirs != "auto" and int(theirs) != total:
        raise UserError(f"{source} sets train_batch_size={theirs} but micro batch x accumulation x "
                        f"world size = {total}; use \"auto\"")
    ds["train_batch_size"] = total
    if ds.get("fp16", {}).get("enabled"):
        raise UserError(f"{source} enables fp16; megaclip trains in bf16 or fp32")
    _accumulate_in_fp32(ds, source)
    # Our optimisers are client optimisers (FusedAdam, torch AdamW, apex): ZeRO accepts them.
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 1 << 30)  # the trainer prints its own progress
    return ds


def _accumulate_in_fp32(ds: dict, source: str) -> None:
    """Under bf16, DeepSpeed sums the micro-batches' gradients in the model's dtype unless
    ``data_types.grad_accum_dtype`` says otherwise: 8 significant bits, so with accumulation
    the small gradients of later micro-batches round away. ZeRO stages 1-3 accumulate in fp32
    when asked (stage 3 in its flat partition buffer, stage 2 in its compact fp32 partition);
    without ZeRO DeepSpeed 0.19 refuses the mix, so stage 0 keeps bf16 unless the JSON says
    otherwise, and then the error is ours."""
    if model_dtype(ds) != torch.bfloat16:
        return
    types = ds.setdefault("data_types", {})
    if zero_stage(ds) >= 1:
        types.setdefault("grad_accum_dtype", "fp32")
    elif types.get("grad_accum_dtype", "bf16") != "bf16":
        raise UserError(f"{source} sets data_types.grad_accum_dtype="
                        f"{types['grad_accum_dtype']} without ZeRO (stage 0); DeepSpeed "
                        f"accumulates in fp32 under bf16 only with ZeRO stages 1-3")


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def model_dtype(ds: dict) -> torch.dtype:
    return torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32


def check_precision(ds: dict, device: torch.device, source: str = "DeepSpeed config") -> None:
    """bf16 needs a GPU: on a CPU a bf16 step is emulated where oneDNN lacks bf16 kernels (an
    open_clip B/16 step took 57 s against 1.6 s in fp32), so refuse rather than crawl."""
    if model_dtype(ds) == torch.bfloat16 and device.type == "cpu":
        raise UserError(f"{source} enables bf16, but no GPU is visible (check the driver and "
                        f"CUDA_VISIBLE_DEVICES). On the CPU, train in fp32 with "
                        f"ds_configs/zero3_cpu.json.")
