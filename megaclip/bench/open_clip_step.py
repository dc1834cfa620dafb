"""open_clip's own train step on megaclip's architecture, for side-by-side step times.

The same widths, depths, heads, patch and image size, context length, vocabulary and embedding
size as a resolved megaclip ``ModelConfig``, built as open_clip's ``CLIP`` (its own ViT and text
transformer), trained as ``open_clip_train`` does: ``ClipLoss``, ``torch.optim.AdamW`` with
weight decay off for gains and biases, one process, no DeepSpeed. A figure printer's helper,
not part of training.
"""
from __future__ import annotations

import statistics
import time

import torch

from megaclip.config import ModelConfig


def build_open_clip(model: ModelConfig):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    v, t = model.vision, model.text
    vision = CLIPVisionCfg(layers=v.depth, width=v.width, head_width=v.width // v.heads,
                           mlp_ratio=v.mlp_ratio, patch_size=v.patch_size, image_size=v.image_size)
    text = CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                       heads=t.heads, layers=t.depth, mlp_ratio=t.mlp_ratio)
    return CLIP(model.embed_dim, vision, text)


class OpenClipStepper:
    """open_clip's CLIP step at ``batch`` on random data, one timed step at a time: fp32 on the
    CPU, bf16 autocast on a GPU (open_clip_train's ``--precision amp_bf16``)."""

    def __init__(self, model_cfg: ModelConfig, batch: int, lr: float, weight_decay: float):
        from open_clip.loss import ClipLoss
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        gen = torch.Generator().manual_seed(0)
        self.model = build_open_clip(model_cfg).to(self.device).train()
        # open_clip_train/main.py: no weight decay on gains, biases, embeddings, logit scale.
        params = list(self.model.named_parameters())
        skip = [p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
                for n, p in params]
        groups = [{"params": [p for (_, p), s in zip(params, skip) if s], "weight_decay": 0.0},
                  {"params": [p for (_, p), s in zip(params, skip) if not s],
                   "weight_decay": weight_decay}]
        self.opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
        self.loss = ClipLoss()
        v, t = model_cfg.vision, model_cfg.text
        self.images = torch.randn(batch, 3, v.image_size, v.image_size, generator=gen).to(self.device)
        self.tokens = torch.randint(4, t.vocab_size, (batch, t.context_length),
                                    generator=gen).to(self.device)
        self.batch = batch

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self) -> float:
        self.sync()
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            image_f, text_f, scale = self.model(self.images, self.tokens)
            loss = self.loss(image_f, text_f, scale)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, 4.6052)
        self.sync()
        return time.perf_counter() - start


def measure_open_clip(model_cfg: ModelConfig, batch: int, steps: int, warmup: int, lr: float,
                      weight_decay: float) -> dict:
    """Median and fastest step of open_clip's step alone in this process."""
    stepper = OpenClipStepper(model_cfg, batch, lr, weight_decay)
    times = [stepper.step() for _ in range(warmup + steps)][warmup:]
    step_time = statistics.median(times)
    return {"objective": "open_clip", "device": stepper.device.type, "batch": batch,
            "step_time_s": step_time, "step_time_min_s": min(times),
            "samples_per_s": batch / step_time, "optimizer": "torch AdamW (open_clip_train's)",
            "params_m": sum(p.numel() for p in stepper.model.parameters()) / 1e6}
