"""Launched by tests/engine/test_accum.py under `deepspeed --num_gpus 2`: two optimiser steps of
the tiny model through the real ZeRO-3 engine (fp32), for clip and siglip, each on the same
global batches of 4 x MICRO samples cut three ways:

- ``whole``: one micro-batch of 2 x MICRO per rank;
- ``accum``: two micro-batches of MICRO per rank, with train.accum_negatives;
- ``plain``: the same two micro-batches without it.

Rank 0 writes per way the loss of each step (averaged over micro-batches and ranks), every
parameter's whole gradient at each accumulation boundary (fp32, before the optimiser step) and
the parameters after the last step."""
import dataclasses
import json
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from megaclip.config import load_config
from megaclip.distributed import all_reduce_sum, init_distributed, rank_device, setup_device, world
from megaclip.engine.accum import accumulates_negatives, train_steps_accumulated
from megaclip.engine.ds_config import load_ds_config, merge_ds_config, model_dtype
from megaclip.engine.optim import build_optimizer, param_groups
from megaclip.engine.step import to_device, train_step
from megaclip.models import build_model, resolve_model_config
from megaclip.objectives.loss import ObjectiveLoss
from megaclip.zero3 import gathered

MICRO, VOCAB, STEPS = 4, 128, 2
WAYS = {"whole": (2 * MICRO, 1, False), "accum": (MICRO, 2, True), "plain": (MICRO, 2, False)}


def global_batch(cfg, step: int, n: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    side, ctx = cfg.model.vision.image_size, cfg.model.text.context_length
    return {"images": torch.randn(n, 3, side, side, generator=g),
            "tokens": torch.randint(4, VOCAB, (n, ctx), generator=g),
            "eot": torch.randint(1, ctx, (n,), generator=g)}


def run(ds_path: str, contrastive: str, way: str) -> dict:
    rank, ws = world()
    micro, accum, negatives = WAYS[way]
    cfg = load_config("clip_tiny_synthetic", [
        f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}",
        f"train.accum_negatives={str(negatives).lower()}", f"objective.contrastive={contrastive}",
        "optim.warmup_steps=0", "optim.lr=0.002", "model.grad_checkpointing=true"])
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model, VOCAB))
    ds = merge_ds_config(load_ds_config(ds_path), cfg.train, ws)
    dtype = model_dtype(ds)
    model = build_model(cfg.model, cfg.objective, seed=0, zero3_config=ds, dtype=dtype)
    opt, _ = build_optimizer(cfg.optim, param_groups(model, cfg.optim.weight_decay), "cpu")
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    objective = ObjectiveLoss(cfg.objective, STEPS)
    named = list(engine.module.named_parameters())
    grads, real_step = [], engine.step

    def step_keeping_gradients():
        if engine.is_gradient_accumulation_boundary():  # every rank: the gather is collective
            grads.append({n: safe_get_full_grad(p).float().clone() for n, p in named})
        real_step()

    engine.step = step_keeping_gradients
    losses = []
    for step in range(STEPS):
        batch = global_batch(cfg, step, 2 * MICRO * ws)
        mine = {k: v[rank * 2 * MICRO:(rank + 1) * 2 * MICRO] for k, v in batch.items()}
        micro_batches = [to_device({k: v[j * micro:(j + 1) * micro] for k, v in mine.items()},
                                   rank_device(), dtype) for j in range(accum)]
        if accumulates_negatives(cfg.train):
            logged = train_steps_accumulated(engine, objective, micro_batches, step=step)
        else:
            logged = [train_step(engine, objective, b, step=step) for b in micro_batches]
        loss = sum(t["loss"].float() for t in logged) / accum
        losses.append(all_reduce_sum(loss.clone()).item() / ws)
    with gathered([p for _, p in named]):
        params = {n: p.detach().float().clone() for n, p in named}
    return {"losses": losses, "grads": grads, "params": params}


def main(ds_path: str, out: str) -> None:
    setup_device()
    init_distributed()
    report = {}
    for contrastive in ("clip", "siglip"):
        results = {way: run(ds_path, contrastive, way) for way in WAYS}
        ref = results["whole"]
        report[contrastive] = {"losses": {w: r["losses"] for w, r in results.items()}}
        for way in ("accum", "plain"):
            r = results[way]
            # Largest difference to the whole-batch way, relative to the largest entry there.
            report[contrastive][f"grad_diff_{way}"] = [
                max(float((a[n] - b[n]).abs().max()) for n in b)
                / max(float(b[n].abs().max()) for n in b)
                for a, b in zip(r["grads"], ref["grads"])]
            report[contrastive][f"param_diff_{way}"] = max(
                float((r["params"][n] - ref["params"][n]).abs().max()) for n in ref["params"])
            report[contrastive][f"logit_scale_grad_{way}"] = [
                float(g["logit_scale"].reshape(-1)[0]) for g in r["grads"]]
        report[contrastive]["logit_scale_grad_whole"] = [
            float(g["logit_scale"].reshape(-1)[0]) for g in ref["grads"]]
    if world()[0] == 0:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], args[1])
