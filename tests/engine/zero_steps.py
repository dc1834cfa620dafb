"""Launched by tests/engine/test_zero3.py under `deepspeed --num_gpus N`: a few training steps of
the tiny model through the real engine on a fixed global batch; rank 0 writes a JSON report."""
import dataclasses
import json
import math
import sys

import deepspeed
import torch

from megaclip.config import load_config
from megaclip.distributed import all_reduce_sum, init_distributed, rank_device, setup_device, world
from megaclip.engine.ds_config import load_ds_config, merge_ds_config, model_dtype, zero_stage
from megaclip.engine.optim import build_optimizer, param_groups
from megaclip.engine.step import to_device, train_step
from megaclip.objectives.loss import ObjectiveLoss as Objective
from megaclip.models import build_model, resolve_model_config

GLOBAL_BATCH, VOCAB = 8, 128


def collectives_checked() -> bool:
    """Whether every torch.distributed collective of this process checks its tensors' device:
    a tensor off the rank's device must be refused before it reaches the backend."""
    try:
        torch.distributed.all_reduce(torch.ones(1, device="meta"))
    except RuntimeError as e:
        return "this rank's device is" in str(e)
    return False


def main(ds_path: str, out: str, steps: int, extra: tuple = ()) -> None:
    setup_device()  # as the trainer does: first, and with MEGACLIP_CHECK_COLLECTIVES honoured
    init_distributed()
    rank, ws = world()
    cfg = load_config("clip_tiny_synthetic", [f"train.micro_batch_size={GLOBAL_BATCH // ws}",
                                              "model.grad_checkpointing=true",
                                              "optim.warmup_steps=0", "optim.lr=0.002",
                                              *extra])
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model, VOCAB))
    ds = merge_ds_config(load_ds_config(ds_path), cfg.train, ws)
    dtype = model_dtype(ds)
    model = build_model(cfg.model, cfg.objective, seed=0,
                        zero3_config=ds if zero_stage(ds) == 3 else None, dtype=dtype)
    partition = [(int(p.ds_tensor.numel()), int(p.ds_numel)) for p in model.parameters()
                 if hasattr(p, "ds_tensor")]
    leaves = sum(deepspeed.utils.z3_leaf_module(m) for m in model.modules())
    opt, _ = build_optimizer(cfg.optim, param_groups(model, cfg.optim.weight_decay), "cpu")
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    objective = Objective(cfg.objective, steps)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + step)
        side, ctx = cfg.model.vision.image_size, cfg.model.text.context_length
        batch = {"images": torch.randn(GLOBAL_BATCH, 3, side, side, generator=g),
                 "tokens": torch.randint(4, VOCAB, (GLOBAL_BATCH, ctx), generator=g),
                 "eot": torch.randint(1, ctx, (GLOBAL_BATCH,), generator=g)}
        n = GLOBAL_BATCH // ws
        local = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
        terms = train_step(engine, objective, to_device(local, rank_device(), dtype))
        losses.append(all_reduce_sum(terms["loss"].float().clone()).item() / ws)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "partition": partition, "world_size": ws,
                       "leaf_blocks": leaves,
                       "collectives_checked": collectives_checked(),
                       "finite": all(math.isfinite(x) for x in losses)}, f)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], args[1], int(args[2]), tuple(args[3:]))
