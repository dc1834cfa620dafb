"""Parameter groups (decoupled weight decay) and the choice of fused Adam."""
from __future__ import annotations

import torch
from torch import nn

from megaclip.config import OptimConfig
from megaclip.distributed import all_reduce_sum, rank_device
from megaclip.errors import UserError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No decay on biases, norms, embeddings, class token, position embeddings, logit scale.

    Under ZeRO-3 a parameter's local tensor is a flat shard; its real shape is ``ds_shape``.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def resolve_impl(impl: str, device_type: str) -> str:
    if impl == "auto":
        return "deepspeed_fused" if device_type == "cuda" else "torch_fused"
    return impl


def _deepspeed_fused_adam(groups: list[dict], **kw) -> torch.optim.Optimizer:
    """DeepSpeed's FusedAdam, whose CUDA op is compiled on first use (nvcc matching torch's CUDA)."""
    from deepspeed.ops.adam import FusedAdam
    return FusedAdam(groups, adam_w_mode=True, **kw)


def build_optimizer(cfg: OptimConfig, groups: list[dict], device_type: str
                    ) -> tuple[torch.optim.Optimizer, str]:
    """(optimiser, a line for the log saying which one runs). With ``impl: auto`` on CUDA,
    DeepSpeed's FusedAdam when its op builds and loads, otherwise torch's fused AdamW."""
    impl = resolve_impl(cfg.impl, device_type)
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if impl == "deepspeed_fused":
        if device_type != "cuda":
            raise UserError("optim.impl=deepspeed_fused needs CUDA; on the CPU use torch_fused")
        optimizer, why = None, "it failed on another rank"
        try:
            optimizer = _deepspeed_fused_adam(groups, **kw)
        except Exception as e:  # noqa: BLE001 - nvcc missing, CUDA mismatch, compile error...
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        # Every rank must run the same optimiser (its state is saved in one format).
        failed = all_reduce_sum(torch.tensor([float(optimizer is None)], device=rank_device()))
        if failed.item() == 0:
            return optimizer, "DeepSpeed FusedAdam"
        if cfg.impl != "auto":
            raise UserError(f"optim.impl=deepspeed_fused: DeepSpeed's FusedAdam could not be "
                            f"built or loaded ({why}); use optim.impl=auto or torch_fused")
        return (torch.optim.AdamW(groups, fused=True, **kw),
                f"torch AdamW (fused), as DeepSpeed's FusedAdam could not be built or loaded "
                f"({why})")
    if impl == "apex_fused":
        try:
            from apex.optimizers import FusedAdam as ApexFusedAdam
        except ImportError:
            raise UserError("optim.impl=apex_fused needs NVIDIA apex built from source "
                            "(github.com/NVIDIA/apex); the registry package named 'apex' is an "
                            "unrelated project. Use optim.impl=auto instead.") from None
        return ApexFusedAdam(groups, adam_w_mode=True, **kw), "NVIDIA apex FusedAdam"
    if impl == "torch_fused":
        return torch.optim.AdamW(groups, fused=True, **kw), "torch AdamW (fused)"
    return torch.optim.AdamW(groups, foreach=True, **kw), "torch AdamW (foreach)"
