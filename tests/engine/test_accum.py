"""Contrastive negatives across gradient accumulation (train.accum_negatives): the summed
gradients of the micro-batches are those of one batch of all of them, in one process and through
the real ZeRO-3 engine at world size 2; without the option they are not; the trainer runs it
end to end (EMA teacher, other terms, a skipped step)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megaclip.config import load_config
from megaclip.engine.accum import (accumulates_negatives, contrastive_inputs,
                                   with_cached_negatives)
from megaclip.errors import UserError
from megaclip.objectives.loss import ObjectiveLoss
from megaclip.objectives.passes import Passes
from tests.conftest import ROOT, free_port

K, B, D, E = 3, 4, 6, 5


class Towers(torch.nn.Module):
    """Two linear towers, a second global view and a learnable scale and bias: what the
    contrastive term reads of the real model."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.img = torch.nn.Parameter(torch.randn(D, E, generator=g))
        self.txt = torch.nn.Parameter(torch.randn(D, E, generator=g))
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = torch.nn.Parameter(torch.tensor(-2.0))

    def forward(self, images, views, texts):
        return {"image_features": F.normalize(images @ self.img, dim=-1),
                "view_image_features": F.normalize(views @ self.img, dim=-1),
                "text_features": F.normalize(texts @ self.txt, dim=-1),
                "logit_scale": self.log_scale.exp(), "logit_bias": self.bias}


@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
@pytest.mark.parametrize("local_loss", [True, False])
def test_micro_batch_gradients_sum_to_the_whole_batch_gradient(contrastive, local_loss):
    cfg = load_config("clip_tiny_synthetic", [f"objective.contrastive={contrastive}",
                                              f"objective.local_loss={str(local_loss).lower()}"])
    objective, model = ObjectiveLoss(cfg.objective, 10), Towers()
    g = torch.Generator().manual_seed(1)
    images, texts = torch.randn(K * B, D, generator=g), torch.randn(K * B, D, generator=g)
    views = torch.randn(1, K * B, D, generator=g)  # (views, samples, D), as the model's
    name = objective.names["contrastive"]

    whole_loss = objective(model(images, views, texts), {})[0][name]
    def grads(loss):  # clip reads no bias
        return torch.autograd.grad(loss, list(model.parameters()), materialize_grads=True)

    whole = grads(whole_loss)

    rows = [slice(j * B, (j + 1) * B) for j in range(K)]
    with torch.no_grad():
        cache = [model(images[r], views[:, r], texts[r]) for r in rows]
    summed, losses = [torch.zeros_like(p) for p in model.parameters()], []
    for j, r in enumerate(rows):
        outputs = model(images[r], views[:, r], texts[r])
        terms, _ = objective(outputs, {}, term_outputs={
            "contrastive": with_cached_negatives(outputs, cache, j)})
        losses.append(terms[name])
        for s, grad in zip(summed, grads(terms[name])):
            s += grad
    for loss in losses:
        torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=0)
    for a, b in zip(summed, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_cached_forward_runs_only_what_the_contrastive_term_reads():
    keys = ("images", "views", "local_views", "tokens", "eot", "keep_index", "masked_index",
            "mlm_tokens", "mlm_target", "mlm_embed")
    batch = {k: torch.zeros(1) for k in keys}
    full = contrastive_inputs(batch, Passes(masked_image=True, full_views=2, caption=True))
    assert sorted(full) == ["eot", "images", "tokens", "views"]
    batch = {k: torch.zeros(1) for k in keys if "views" not in k}  # FLIP-style: one view
    flip = contrastive_inputs(batch, Passes(masked_image=True, caption=True))
    assert sorted(flip) == ["eot", "images", "keep_index", "masked_index", "tokens"]


def test_config_option_is_a_checked_bool_and_needs_accumulation_to_act():
    assert not load_config("clip_tiny_synthetic").train.accum_negatives
    with pytest.raises(UserError, match="'train.accum_negatives' must be a bool"):
        load_config("clip_tiny_synthetic", ["train.accum_negatives=maybe"])
    on = load_config("clip_tiny_synthetic", ["train.accum_negatives=true",
                                             "train.grad_accum_steps=2"])
    assert accumulates_negatives(on.train)
    # One micro-batch per step: accepted (an experiment may run on more ranks without
    # accumulation), and the plain step runs.
    single = load_config("clip_tiny_synthetic", ["train.accum_negatives=true"])
    assert single.train.grad_accum_steps == 1 and not accumulates_negatives(single.train)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_world_size_2_accumulated_negatives_equal_one_big_batch(tmp_path):
    """2 ranks x 2 micro-batches of B with the option: the loss and the gradients at each
    boundary of 2 ranks x 1 micro-batch of 2B (fp32), and parameters after two steps within
    Adam's sensitivity to gradients near zero; without it, clearly not."""
    out = tmp_path / "accum.json"
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    proc = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()),
                           os.path.join(ROOT, "tests", "engine", "accum_steps.py"),
                           os.path.join(ROOT, "ds_configs", "zero3_cpu.json"), str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for contrastive in ("clip", "siglip"):
        r = report[contrastive]
        for a, b in zip(r["losses"]["accum"], r["losses"]["whole"]):
            assert math.isclose(a, b, rel_tol=1e-5), (contrastive, r["losses"])
        # Step 1 from the same parameters; step 2 after updates equal to about 1e-5.
        assert r["grad_diff_accum"][0] < 1e-5 and r["grad_diff_accum"][1] < 1e-4, r
        assert r["param_diff_accum"] < 2e-4, r  # lr 2e-3
        assert r["logit_scale_grad_accum"][0] == pytest.approx(
            r["logit_scale_grad_whole"][0], rel=1e-5)
        # Negatives of one micro-batch: other gradients, other parameters.
        assert r["grad_diff_plain"][0] > 1e-4 and r["param_diff_plain"] > 2e-3, r
    clip = report["clip"]["losses"]
    assert clip["plain"][0] < clip["whole"][0] - 0.3  # fewer negatives, an easier task


@pytest.mark.slow
@pytest.mark.distributed
def test_trainer_runs_maskclip_with_accumulated_negatives_and_skips_a_bad_step(tmp_path,
                                                                             synthetic):
    """Through `deepspeed megaclip/train.py` at world size 2: maskclip (EMA teacher, masked
    distillation and MLM per micro-batch), 2 micro-batches per step, a NaN on rank 1 at step 2
    skipped on every rank."""
    out = tmp_path / "run"
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    proc = subprocess.run(
        [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "megaclip/train.py",
         "--deepspeed_config", "ds_configs/zero3_cpu.json", "--config", "clip_tiny_synthetic",
         f"data.train_shards={synthetic}/train/shard-{{000000..000003}}.tar",
         f"data.tokenizer={synthetic}/spm.model", 'eval.shards=""', f"train.output_dir={out}",
         "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.accum_negatives=true",
         "train.steps=3", "train.log_every=1", "train.ckpt_every=0", "data.shuffle_buffer=16",
         "data.workers=1", "optim.warmup_steps=1", "objective.preset=maskclip",
         "objective.mask_distill.prototypes=64"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "MEGACLIP_INJECT_NAN": "2:1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("contrastive negatives: all 16 samples of the step's 2 micro-batches "
            "(train.accum_negatives" in proc.stdout)
    assert "step 2 skipped on every rank: non-finite " in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r] == [0, 1, 1]
    logged = [r for r in rows if "train/loss" in r]  # a skipped step's terms are not averaged
    assert len(logged) == 2 and all(math.isfinite(r[f"train/{k}"]) for r in logged
                                    for k in ("loss", "clip", "distill", "mlm"))
