"""Zero-shot classification and image-text retrieval, with every rank taking part.

Under ZeRO-3 a forward on one rank alone hangs (the others never join its all-gathers), so each
rank encodes an equal-sized slice of every item list and the features are all-gathered.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from megaclip.data.eval_set import EvalSet
from megaclip.data.tokenizer import Tokenizer
from megaclip.distributed import all_gather_cat, world


def encode_split(n: int, batch_size: int, encode: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """Features of items 0..n-1, each rank encoding items rank, rank+ws, ... (padded so every
    rank runs the same number of equal batches)."""
    rank, ws = world()
    per_rank = math.ceil(n / ws)
    mine = [min(rank + j * ws, n - 1) for j in range(per_rank)]
    feats = torch.cat([encode(mine[i:i + batch_size]) for i in range(0, per_rank, batch_size)])
    gathered = all_gather_cat(feats.float().contiguous())  # row r * per_rank + j = item r + j * ws
    order = gathered.view(ws, per_rank, -1).transpose(0, 1).reshape(ws * per_rank, -1)
    return order[:n]


def recall_at_k(sim: torch.Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    """Row i's positive is column i."""
    target = sim.diagonal().unsqueeze(1)
    rank_of_positive = (sim > target).sum(1)
    return {k: (rank_of_positive < k).float().mean().item() for k in ks}


@torch.no_grad()
def evaluate(model: Callable, data: EvalSet, tokenizer: Tokenizer, batch_size: int,
             device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """``model(images=..)`` / ``model(tokens=.., eot=..)`` return normalised features."""
    def enc_images(idx):
        return model(images=data.images(idx).to(device, dtype))["image_features"]

    def enc_texts(texts):
        def enc(idx):
            tok, eot = tokenizer.encode([texts[i] for i in idx])
            return model(tokens=tok.to(device), eot=eot.to(device))["text_features"]
        return enc

    img = F.normalize(encode_split(len(data), batch_size, enc_images), dim=-1)
    txt = F.normalize(encode_split(len(data), batch_size, enc_texts(data.captions)), dim=-1)
    prompts = data.prompts()
    pf = encode_split(len(prompts), batch_size, enc_texts(prompts))
    cls = F.normalize(F.normalize(pf, dim=-1).view(len(data.classnames), len(data.templates), -1)
                      .mean(1), dim=-1)

    logits = img @ cls.T
    labels = data.labels.to(logits.device)
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    out = {"zeroshot_top1": (top5[:, 0] == labels).float().mean().item(),
           "zeroshot_top5": (top5 == labels[:, None]).any(1).float().mean().item()}
    sim = img @ txt.T
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        for k, v in recall_at_k(s).items():
            out[f"{name}_R@{k}"] = v
    return out
