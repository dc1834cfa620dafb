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


def staged_param_groups(model: nn.Module, weight_decay: float,
                        later: dict[int, tuple[str, ...]]) -> tuple[list[dict], list[int]]:
    """``param_groups``, with the parameters that start training late (``later``: name prefixes
    by their first step, ``Stages.later_params``) in groups of their own, and the first step of
    each group. The trainer gives those groups a learning rate of 0 until their step: their
    gradients are zero before it (the modules do not run), so Adam's moments stay zero, and
    with lr 0 its decoupled weight decay (``p *= 1 - lr * wd``) leaves them exactly as they
    are too (``restart_groups`` then starts their Adam state afresh)."""
    groups = param_groups(model, weight_decay)
    starts = [0] * len(groups)
    if not later:
        return groups, starts
    names = {id(p): n for n, p in model.named_parameters()}

    def first_step(p) -> int:
        return next((s for s, prefixes in later.items() if names[id(p)].startswith(prefixes)), 0)

    for step in later:
        for group in groups[:2]:
            moved = [p for p in group["params"] if first_step(p) == step]
            if moved:
                groups.append({**group, "params": moved, "name": f"{group['name']}@{step}"})
                starts.append(step)
    for group in groups[:2]:
        group["params"] = [p for p in group["params"] if first_step(p) == 0]
    return groups, starts


@torch.no_grad()
def restart_groups(optimizer, group_ids: list[int]) -> None:
    """The Adam state of these parameter groups as a fresh optimiser has it (no step, zero
    moments), so that parameters which start training late get Adam's bias correction from
    their first step, not from the run's. ``optimizer``: DeepSpeed's (ZeRO 1-3 keep fp32
    masters per group, whose state the torch or DeepSpeed Adam inside holds) or a plain one."""
    inner = getattr(optimizer, "optimizer", optimizer)
    ids = set(group_ids)
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3: sub-groups of groups
        masters = [optimizer.fp32_partitioned_groups_flat[j]
                   for j, g in optimizer.sub_group_to_group_id.items() if g in ids]
    elif hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO 1-2
        masters = [optimizer.single_partition_of_fp32_groups[i] for i in sorted(ids)]
    else:
        masters = [p for i in sorted(ids) for p in inner.param_groups[i]["params"]]
    for master in masters:
        state = inner.state.get(master, {})
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif isinstance(value, (int, float)):
                state[key] = type(value)(0)
    for i in ids:  # optimisers that count steps per group
        if "step" in inner.param_groups[i]:
            inner.param_groups[i]["step"] = 0


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
