"""The frozen-feature evaluations of the MaskCLIP and SILC papers, on any encoder:

* linear probe: multinomial logistic regression on pooled image features of a train split, its
  L2 regularisation chosen on a validation split, accuracy on a test split;
* dense probe: a linear classifier on frozen patch tokens against per-pixel masks (trained on
  each patch's majority label, scored per pixel after bilinear upsampling), mIoU;
* zero-shot segmentation: each patch token through the image projection, compared with the
  class prompts' text embeddings (MaskCLIP's patch-text similarity), mIoU.

Features are computed with ``evaluation.encode_split``, so every rank takes part in every
forward (safe under ZeRO-3); the fitting runs on the gathered features, the same on every rank.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megaclip.eval.zeroshot import encode_split

REGULARISATION = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
IGNORE = -1


def split_by_class(labels: torch.Tensor, fractions: tuple, seed: int = 0) -> list[torch.Tensor]:
    """Indices of each part, every class cut by ``fractions`` after a seeded shuffle."""
    parts: list[list[int]] = [[] for _ in fractions]
    g = torch.Generator().manual_seed(seed)
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)].tolist()
        start, cumulative = 0, 0.0
        for i, frac in enumerate(fractions):  # boundaries rounded half up
            cumulative += frac
            end = len(members) if i == len(fractions) - 1 else min(
                len(members), int(len(members) * cumulative + 0.5))
            parts[i].extend(members[start:end])
            start = end
    return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float,
               steps: int = 100) -> torch.nn.Linear:
    """Logistic regression by full-batch L-BFGS from zeros (deterministic, no random draw),
    labels ``IGNORE`` left out."""
    keep = y != IGNORE
    x, y = x[keep].float(), y[keep]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    head = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")
    xs = (x - mean) / std

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(xs), y) + l2 * head.weight.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():  # fold the standardisation into the layer
        head.weight.div_(std)
        head.bias.sub_(head.weight @ mean)
    return head


def linear_probe(train: tuple, val: tuple, test: tuple, classes: int) -> dict[str, float]:
    """(features, labels) per split -> test accuracy with the L2 weight best on val (a set too
    small to hold a validation part gets 1e-4)."""
    best = 1e-4 if len(val[1]) == 0 else max(
        REGULARISATION, key=lambda l2: (_accuracy(fit_linear(*train, classes, l2), *val), -l2))
    head = fit_linear(*train, classes, best)
    return {"linear_probe_top1": _accuracy(head, *test), "linear_probe_l2": best}


def _accuracy(head, x, y) -> float:
    with torch.no_grad():
        return (head(x.float()).argmax(1) == y).float().mean().item()


def mean_iou(pred: torch.Tensor, target: torch.Tensor, classes: int) -> float:
    """Mean over the classes present in ``target`` or ``pred`` of intersection over union;
    ``IGNORE`` pixels left out."""
    keep = target != IGNORE
    pred, target = pred[keep], target[keep]
    inter = torch.bincount(target[pred == target], minlength=classes).float()
    area = torch.bincount(pred, minlength=classes) + torch.bincount(target, minlength=classes)
    union = area.float() - inter
    present = union > 0
    return (inter[present] / union[present]).mean().item() if present.any() else 0.0


def patch_labels(masks: torch.Tensor, grid: int, classes: int) -> torch.Tensor:
    """(B, H, W) pixel labels -> (B, grid*grid) majority label of each patch's pixels (a few
    images at a time: the one-hot votes are B x C x H x W)."""
    out = []
    for chunk in masks.split(16):
        one_hot = F.one_hot(chunk.clamp_min(0), classes).float() * (chunk >= 0)[..., None]
        votes = F.adaptive_avg_pool2d(one_hot.permute(0, 3, 1, 2), grid)  # (b, C, g, g)
        label = votes.argmax(1)
        label[votes.sum(1) == 0] = IGNORE
        out.append(label.flatten(1))
    return torch.cat(out)


def pixel_predictions(patch_logits: torch.Tensor, size: tuple) -> torch.Tensor:
    """(B, N, C) patch logits -> (B, H, W) argmax after bilinear upsampling."""
    B, N, C = patch_logits.shape
    g = int(math.isqrt(N))
    grid = patch_logits.transpose(1, 2).reshape(B, C, g, g).float()
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False).argmax(1)


def dense_probe(train: tuple, test: tuple, classes: int, l2: float = 1e-4) -> dict[str, float]:
    """(patch tokens (B, N, D), masks (B, H, W)) per split -> test mIoU of a linear classifier
    trained on the train patches' majority labels."""
    tokens, masks = train
    grid = int(math.isqrt(tokens.shape[1]))
    head = fit_linear(tokens.flatten(0, 1), patch_labels(masks, grid, classes).flatten(),
                      classes, l2)
    t_tokens, t_masks = test
    with torch.no_grad():
        pred = pixel_predictions(head(t_tokens.float()), t_masks.shape[-2:])
    return {"dense_probe_miou": mean_iou(pred, t_masks, classes)}


def zeroshot_segmentation(patch_embeddings: torch.Tensor, class_embeddings: torch.Tensor,
                          masks: torch.Tensor, background: bool) -> dict[str, float]:
    """Patch embeddings (B, N, E) in the joint space against class text embeddings (C, E): each
    pixel takes the most similar class. Mask label 0 is the background: scored as class 0 when
    ``background`` (the class embeddings then start with the background's), ignored otherwise."""
    sims = F.normalize(patch_embeddings.float(), dim=-1) @ F.normalize(class_embeddings, dim=-1).T
    pred = pixel_predictions(sims, masks.shape[-2:])
    target = masks.clone()
    if not background:
        pred, target = pred + 1, torch.where(target == 0, IGNORE, target)
    return {"zeroshot_seg_miou": mean_iou(pred, target, class_embeddings.shape[0] + 1)}


def gather_tokens(n: int, batch_size: int, tokens_of: Callable[[list[int]], torch.Tensor]
                  ) -> torch.Tensor:
    """Every item's (1 + N, D) tokens, each rank encoding its share (``encode_split``)."""
    first = tokens_of([0])
    shape = first.shape[1:]
    flat = encode_split(n, batch_size, lambda idx: tokens_of(idx).flatten(1))
    return flat.view(n, *shape)


def frozen_evaluations(tokens: torch.Tensor, labels: torch.Tensor, classes: int,
                       masks: Optional[torch.Tensor], patch_embeddings: Optional[torch.Tensor],
                       class_embeddings: Optional[torch.Tensor], background: bool,
                       splits: Optional[tuple] = None) -> dict[str, float]:
    """The linear probe (pooled token), and with masks the dense probe and zero-shot
    segmentation, on one labelled set cut into train/val/test (``splits``: index tensors, or
    50/20/30% per class)."""
    train, val, test = splits or split_by_class(labels, (0.5, 0.2, 0.3))
    pooled = tokens[:, 0]
    out = linear_probe((pooled[train], labels[train]), (pooled[val], labels[val]),
                       (pooled[test], labels[test]), classes)
    if masks is not None:
        mask_classes = int(masks.max()) + 1
        fit = torch.cat([train, val])
        out.update(dense_probe((tokens[fit, 1:], masks[fit]), (tokens[test, 1:], masks[test]),
                               mask_classes))
        if patch_embeddings is not None and class_embeddings is not None:
            out.update(zeroshot_segmentation(patch_embeddings[test], class_embeddings,
                                             masks[test], background))
    return out


@torch.no_grad()
def class_text_embeddings(model, tokenizer, names: list[str], templates: list[str],
                          batch_size: int, device: torch.device) -> torch.Tensor:
    """(classes, E): each class's normalised mean over its prompts' text features."""
    prompts = [t.format(c) for c in names for t in templates]

    def enc(idx):
        tok, eot = tokenizer.encode([prompts[i] for i in idx])
        return model(tokens=tok.to(device), eot=eot.to(device))["text_features"]
    feats = F.normalize(encode_split(len(prompts), batch_size, enc), dim=-1)
    return F.normalize(feats.view(len(names), len(templates), -1).mean(1), dim=-1)


@torch.no_grad()
def run_probes(model, data, tokenizer, batch_size: int, device: torch.device, dtype: torch.dtype,
               trunk=None, parts: Optional[tuple] = None) -> dict[str, float]:
    """The frozen evaluations with the student's image trunk, or ``trunk`` (the EMA teacher's)
    for the probes; zero-shot segmentation always reads the student, whose projection and text
    tower it needs. ``data`` (an EvalSet) is cut 50/20/30% per class into train/val/test, unless
    ``parts`` gives the (train, val) EvalSets, ``data`` then being the test split."""
    sets = [*(parts or ()), data]
    if model.visual.proj is None:
        from megaclip.errors import UserError
        raise UserError("the probes read the class token, which a model with "
                        "model.vision.pool=map has none of: evaluate it without them "
                        "(tools/eval.py --no-probes)")

    def tokens_of(dataset, encoder):
        return gather_tokens(len(dataset), batch_size,
                             lambda idx: encoder(dataset.images(idx).to(device, dtype)))

    def student(x):
        return model.visual(x)[1]
    probe = trunk if trunk is not None else student
    has_masks = all(d.has_masks for d in sets)
    if not has_masks:  # the linear probe reads the class token alone: gather nothing else
        pooled_only = probe

        def probe(x):
            return pooled_only(x)[:, :1]
    tokens = torch.cat([tokens_of(d, probe).float().cpu() for d in sets])
    labels = torch.cat([d.labels for d in sets])
    splits = None
    if parts:
        ends = torch.tensor([len(d) for d in sets]).cumsum(0).tolist()
        splits = tuple(torch.arange(a, b) for a, b in zip([0] + ends[:-1], ends))
    masks = torch.cat([d.masks(list(range(len(d)))) for d in sets]) if has_masks else None
    patch_embeddings = class_embeddings = None
    background = bool(data.background_templates)
    if masks is not None:
        own = tokens if trunk is None else torch.cat([tokens_of(d, student).float().cpu()
                                                      for d in sets])
        proj = model.visual.proj
        patch_embeddings = torch.cat([proj(own[i:i + batch_size, 1:].to(device, dtype))
                                      .float().cpu() for i in range(0, len(own), batch_size)])
        class_embeddings = class_text_embeddings(model, tokenizer, data.classnames,
                                                 data.templates, batch_size, device).cpu()
        if background:
            bg = class_text_embeddings(model, tokenizer, [""], data.background_templates,
                                       batch_size, device).cpu()
            class_embeddings = torch.cat([bg, class_embeddings])
    return frozen_evaluations(tokens, labels, len(data.classnames), masks, patch_embeddings,
                              class_embeddings, background, splits)
