"""Launched by tests/test_untrusted_checkpoints.py (one rank): two steps of the tiny model on a
bf16 DeepSpeed config, a megaclip checkpoint of them, that checkpoint loaded into a fresh engine
by megaclip's resume (every file weights-only) and saved again under another folder.

    python tests/bf16_checkpoint.py DS_CONFIG TOKENIZER OUT
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from megaclip.checkpoint import io  # noqa: E402
from megaclip.config import load_config  # noqa: E402
from megaclip.distributed import default_env, init_distributed, rank_device, setup_device  # noqa
from megaclip.engine.ds_config import (load_ds_config, merge_ds_config, model_dtype,  # noqa
                                       zero_stage)
from megaclip.engine.optim import build_optimizer, param_groups  # noqa: E402
from megaclip.engine.step import to_device, train_step  # noqa: E402
from megaclip.models import build_model, resolve_model_config  # noqa: E402
from megaclip.objectives.loss import ObjectiveLoss  # noqa: E402

BATCH, VOCAB = 4, 128


def engine_for(cfg, ds, seed):
    dtype = model_dtype(ds)
    model = build_model(cfg.model, cfg.objective, seed=seed,
                        zero3_config=ds if zero_stage(ds) == 3 else None, dtype=dtype)
    opt, _ = build_optimizer(cfg.optim, param_groups(model, cfg.optim.weight_decay), "cpu")
    kind = f"{type(opt).__module__}.{type(opt).__qualname__}"
    return deepspeed.initialize(model=model, optimizer=opt, config=ds)[0], dtype, kind


def main(ds_path: str, tokenizer: str, out: str) -> None:
    default_env()
    setup_device()
    init_distributed()
    cfg = load_config("clip_tiny_synthetic", [f"train.micro_batch_size={BATCH}",
                                              "optim.warmup_steps=0",
                                              f"data.tokenizer={tokenizer}"])
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model, VOCAB))
    ds = merge_ds_config(load_ds_config(ds_path), cfg.train, 1)
    engine, dtype, kind = engine_for(cfg, ds, seed=0)
    objective = ObjectiveLoss(cfg.objective, 2)
    side, ctx = cfg.model.vision.image_size, cfg.model.text.context_length
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        batch = {"images": torch.randn(BATCH, 3, side, side, generator=g),
                 "tokens": torch.randint(4, VOCAB, (BATCH, ctx), generator=g),
                 "eot": torch.randint(1, ctx, (BATCH,), generator=g)}
        train_step(engine, objective, to_device(batch, rank_device(), dtype))
    saved = io.save(engine, os.path.join(out, "a"), 2, lambda tmp: None, 0, cfg, kind)
    fresh, _, _ = engine_for(cfg, ds, seed=1)
    io.load(fresh, saved, os.path.join(out, "b"))
    io.save(fresh, os.path.join(out, "b"), 2, lambda tmp: None, 0, cfg, kind)


if __name__ == "__main__":
    main(*sys.argv[1:4])
