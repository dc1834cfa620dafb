"""Parameter groups (decoupled weight decay, layer-wise learning rates) and the choice of fused
Adam."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megaclip.config import OptimConfig
from megaclip.models.layers import layer_scale, tower_part
from megaclip.distributed import all_reduce_sum, rank_device
from megaclip.errors import UserError


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 depth: Optional[dict[str, int]] = None) -> list[dict]:
    """No decay on biases, norms, embeddings, class token, position embeddings, logit scale.
    Locked parameters (``requires_grad`` off) are left out.

    With ``layer_decay`` below 1 (``depth``: each tower's number of blocks), each (tower part,
    decay or not) is a group of its own whose ``lr_scale`` is BEiT's layer decay
    (``models/layers.py``); the step's learning rate is ``lr_scale`` x the schedule's
    (``set_lr``). Which groups exist depends on the towers' depths and the locks only, not on
    the decay's value.

    Under ZeRO-3 a parameter's local tensor is a flat shard; its real shape is ``ds_shape``.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        decays = not (ndim < 2 or name in skip)
        kind = "decay" if decays else "no_decay"
        if layer_decay == 1.0:
            key, scale, label = (kind,), None, kind
        else:
            where = tower_part(name, depth)
            tower, part = where if where is not None else ("other", -1)
            scale = layer_scale(None if where is None else part, depth.get(tower, 0), layer_decay)
            key = (tower, part, kind)
            label = f"{tower}.{part}/{kind}" if where is not None else f"other/{kind}"
        group = groups.setdefault(key, {"params": [], "weight_decay": weight_decay if decays
                                        else 0.0, "name": label})
        if scale is not None:
            group["lr_scale"] = scale
        group["params"].append(p)
    if layer_decay == 1.0:  # the two groups every earlier run had, in their order
        return [groups[(k,)] for k in ("decay", "no_decay") if (k,) in groups]
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1], k[2]))]


def set_lr(optimizer, lr: float) -> None:
    """The step's learning rate into every group: ``lr`` x the group's ``lr_scale`` (1 without
    layer decay). DeepSpeed's optimisers keep the groups' extra keys, so this is read off the
    groups the engine steps with."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def groups_summary(groups: list[dict], layer_decay: float) -> str:
    """A line for the log: the groups and their learning-rate scales."""
    if layer_decay == 1.0:
        return ""
    scales = sorted({g["lr_scale"] for g in groups})
    return (f"layer decay {layer_decay:g}: {len(groups)} parameter groups, learning-rate scales "
            f"from {scales[0]:.4g} to {scales[-1]:.4g}")


def staged_param_groups(model: nn.Module, weight_decay: float,
                        later: dict[int, tuple[str, ...]], layer_decay: float = 1.0,
                        depth: Optional[dict[str, int]] = None) -> tuple[list[dict], list[int]]:
    """``param_groups``, with the parameters that start training late (``later``: name prefixes
    by their first step, ``Stages.later_params``) in groups of their own, and the first step of
    each group. The trainer gives those groups a learning rate of 0 until their step: their
    gradients are zero before it (the modules do not run), so Adam's moments stay zero, and
    with lr 0 its decoupled weight decay (``p *= 1 - lr * wd``) leaves them exactly as they
    are too (``restart_groups`` then starts their Adam state afresh). A late group keeps its
    layer-decay scale; a group that late parameters leave empty is dropped."""
    groups = param_groups(model, weight_decay, layer_decay, depth)
    starts = [0] * len(groups)
    if not later:
        return groups, starts
    names = {id(p): n for n, p in model.named_parameters()}

    def first_step(p) -> int:
        return next((s for s, prefixes in later.items() if names[id(p)].startswith(prefixes)), 0)

    base = list(groups)
    for step in later:
        for group in base:
            moved = [p for p in group["params"] if first_step(p) == step]
            if moved:
                groups.append({**group, "params": moved, "name": f"{group['name']}@{step}"})
                starts.append(step)
    for group in base:
        group["params"] = [p for p in group["params"] if first_step(p) == 0]
    kept = [i for i, g in enumerate(groups) if g["params"]]
    return [groups[i] for i in kept], [starts[i] for i in kept]


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


def _group_layout(model: dict, optim: dict) -> dict[str, object]:
    """The settings that decide which parameters the optimiser holds and how they are grouped,
    from a config's ``model`` and ``optim`` sections as plain mappings (older configs lack them:
    the defaults)."""
    out: dict[str, object] = {}
    for tower, key in (("image", "lock_image_unlocked_groups"),
                       ("text", "lock_text_unlocked_layers")):
        out[f"model.lock_{tower}"] = bool(model.get(f"lock_{tower}", False))
        if out[f"model.lock_{tower}"]:
            out[f"model.{key}"] = int(model.get(key, 0))
    out["optim.layer_decay"] = "1 (off)" if float(optim.get("layer_decay", 1.0)) == 1.0 else "on"
    return out


def check_group_layout(tag_dir: str, cfg) -> None:
    """A checkpoint's optimiser state fits this run only if the same parameters are trained in
    the same groups: the locks and whether layer decay is on must be the checkpoint's (the
    decay's value may change, as the learning rate may)."""
    import os

    import yaml

    from megaclip.config import to_dict
    path = os.path.join(tag_dir, "config.yaml")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = yaml.safe_load(f) or {}
    theirs = _group_layout(saved.get("model") or {}, saved.get("optim") or {})
    ours = _group_layout(to_dict(cfg.model), to_dict(cfg.optim))
    differ = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    if differ:
        raise UserError(f"checkpoint {tag_dir} was trained with "
                        + ", ".join(f"{k}={theirs.get(k, '-')}" for k in differ)
                        + "; this run has " + ", ".join(f"{k}={ours.get(k, '-')}" for k in differ)
                        + ": its optimiser holds other parameters or groups, so it cannot resume "
                          "this run; set them as the checkpoint has them")
