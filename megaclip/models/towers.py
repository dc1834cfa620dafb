"""The two-tower model: image tower, text tower, learnable temperature (and SigLIP bias), and
the student-side modules of the self-distillation objectives when they are configured. Which
passes a training forward runs is the objective's ``Passes`` (``objectives/passes.py``); each
tower runs all of its passes in one call, every block once (``models/blocks.py``)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megaclip.models.decoders import MaskedPatchDecoder, TextMlmDecoder
from megaclip.models.heads import PrototypeHead
from megaclip.models.text import TextTower
from megaclip.models.vision import VisionTower
from megaclip.objectives.passes import Passes


class TwoTower(nn.Module):
    """Returns L2-normalised image/text features, the (clamped) logit scale and, with masks in
    the batch, the student's predictions for the masked patches and masked caption pieces.

    The clamp happens here, inside ``forward``: under ZeRO-3 the module's copy of
    ``logit_scale`` is an empty placeholder outside forward, so clamping it in place after the
    optimiser step would silently do nothing.
    """

    def __init__(self, visual: VisionTower, text: TextTower, init_logit_scale: float,
                 max_logit_scale: float, init_logit_bias: Optional[float] = None,
                 patch_decoder: Optional[MaskedPatchDecoder] = None,
                 distill_head: Optional[PrototypeHead] = None,
                 text_decoder: Optional[TextMlmDecoder] = None,
                 passes: Passes = Passes(full_views=1, caption=True),
                 global_head: Optional[PrototypeHead] = None):
        super().__init__()
        self.visual = visual
        self.text = text
        self.max_log_scale = math.log(max_logit_scale)
        # Shape (1,), not a 0-d tensor: ZeRO-3 partitions parameters through a byte view.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(init_logit_scale)))
        self.logit_bias = (nn.Parameter(torch.full((1,), float(init_logit_bias)))
                           if init_logit_bias is not None else None)
        self.patch_decoder = patch_decoder
        self.distill_head = distill_head
        self.text_decoder = text_decoder
        self.global_head = global_head
        self.passes = passes

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def tower_blocks(self, tower: str) -> list[nn.Module]:
        """The transformer blocks of ``tower`` (``visual`` or ``text``), in order."""
        return list(self.visual.trunk.blocks if tower == "visual" else self.text.blocks)

    def leaf_blocks(self) -> dict[str, list[nn.Module]]:
        """The transformer blocks of each tower and decoder, by name: a training forward calls
        each of them once (a tower takes all its inputs in one call), so each can be one ZeRO-3
        leaf module."""
        groups = {"visual": self.tower_blocks("visual"), "text": self.tower_blocks("text")}
        for name in ("patch_decoder", "text_decoder"):
            if getattr(self, name) is not None:
                groups[name] = list(getattr(self, name).blocks)
        return groups

    def compile_blocks(self) -> None:
        """``torch.compile`` every transformer block of both towers, in place (module names and
        state-dict keys unchanged)."""
        for blk in [*self.tower_blocks("visual"), *self.tower_blocks("text")]:
            blk.compile()

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides biases and norms (timm contract)."""
        return {"logit_scale", "logit_bias", "visual.trunk.cls_token", "visual.trunk.pos_embed",
                "text.positional_embedding", "text.token_embedding.weight", "text.mask_embedding",
                "patch_decoder.mask_token", "patch_decoder.pos_embed"}

    def forward(self, images: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None,
                eot: Optional[torch.Tensor] = None, keep_index: Optional[torch.Tensor] = None,
                masked_index: Optional[torch.Tensor] = None,
                mlm_tokens: Optional[torch.Tensor] = None, mlm_index: Optional[torch.Tensor] = None,
                mlm_embed: Optional[torch.Tensor] = None, views: Optional[torch.Tensor] = None,
                local_views: Optional[torch.Tensor] = None,
                mlm_valid: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """``images`` (B, 3, S, S); SILC adds the other global crops ``views`` (B, G-1, 3, S, S)
        and the local crops ``local_views`` (B, L, 3, s, s). Outputs: ``image_features`` of
        ``images`` (B, E), ``view_image_features`` of ``views`` (G-1, B, E) and
        ``global_student_logits`` (G + L, B, K), view-major, global views first."""
        out: dict[str, torch.Tensor] = {}
        # What runs is what ``self.passes`` lists (the objective's passes at this step: a term
        # that has not started yet runs nothing, objectives/stages.py) and the batch holds.
        plan = self.passes
        distill = self.patch_decoder is not None and "patch_logits" in plan.teacher_outputs
        pooled_head = self.global_head is not None and "global_logits" in plan.teacher_outputs
        if images is not None:
            B = images.shape[0]
            # the student sees the visible patches only
            masked = keep_index is not None and plan.masked_image
            whole = not masked or plan.full_views > 0  # else FLIP-style: no whole view
            local = pooled_head and local_views is not None and local_views.shape[1] > 0
            passes = ([(view_major(images, views), None)] if whole else []) \
                + ([(images, keep_index)] if masked else []) \
                + ([(view_major(None, local_views), None)] if local else [])
            ran = self.visual(*passes[0], more=passes[1:])  # every pass in one trunk call
            ran = [ran] if len(passes) == 1 else ran
            if whole:
                feature, tokens_ = ran.pop(0)
                image_feature, pooled = feature[:B], tokens_[:, 0]
                if feature.shape[0] > B:
                    out["view_image_features"] = F.normalize(
                        feature[B:].unflatten(0, (-1, B)), dim=-1)
            if masked:
                masked_pass = ran.pop(0)
                if not whole:
                    image_feature = masked_pass[0]
                if distill:
                    decoded = self.patch_decoder(masked_pass[1], keep_index, masked_index)
                    out["student_patch_logits"] = self.distill_head(decoded)
            out["image_features"] = F.normalize(image_feature, dim=-1)
            if pooled_head and (views is not None or local):
                if local:
                    pooled = torch.cat([pooled, ran.pop(0)[1][:, 0]])
                out["global_student_logits"] = self.global_head(pooled).unflatten(0, (-1, B))
        mlm = mlm_tokens is not None and self.text_decoder is not None and plan.masked_caption
        if tokens is not None or mlm:
            # The caption and the masked caption (same length) in one text pass, caption first.
            rows = ([tokens] if tokens is not None else []) + ([mlm_tokens] if mlm else [])
            embed_mask = None
            if mlm and mlm_embed is not None:
                embed_mask = _cat(([torch.zeros_like(mlm_embed)] if tokens is not None else [])
                                  + [mlm_embed])
            feature, hidden = self.text(_cat(rows), eot if tokens is not None else eot[:0],
                                        embed_mask)
            if tokens is not None:
                out["text_features"] = F.normalize(feature, dim=-1)
            if mlm:
                out["mlm_logits"] = self.text_decoder(hidden[-mlm_tokens.shape[0]:], eot,
                                                      mlm_index)
        # fp32 whatever the model's dtype (open_clip keeps these scalars in fp32). Under bf16
        # the parameter itself is the bf16 copy of DeepSpeed's fp32 master (ZeRO-3 keeps one
        # dtype for every trained parameter); the exp and everything after it are fp32.
        out["logit_scale"] = self.logit_scale.float().clamp(max=self.max_log_scale).exp()[0]
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.float()[0]
        return out


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def view_major(first: Optional[torch.Tensor], views: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, 3, H, W) and (B, V, 3, H, W) -> ((1 + V) x B, 3, H, W), view by view."""
    parts = [] if first is None else [first]
    if views is not None and views.shape[1]:
        parts.append(views.transpose(0, 1).flatten(0, 1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
