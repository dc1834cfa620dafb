"""Masks drawn in the data pipeline, one generator per sample (seeded like the crops).

Image masks hold exactly ``round(ratio * N)`` masked patches, so every sample in a batch keeps
the same number of visible tokens and the encoder can drop the masked ones (MAE-style).
Text masks follow BERT: a fraction of the caption's pieces is chosen; of those, most are shown
to the encoder as a learnable [MASK] embedding, some as a random piece, the rest unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from megaclip.config import MaskConfig, TextMlmConfig


def num_masked(num_patches: int, ratio: float) -> int:
    """Masked patches per image: at least one masked and one visible."""
    return min(num_patches - 1, max(1, int(round(ratio * num_patches))))


def random_mask(rng: np.random.Generator, grid: int, ratio: float) -> np.ndarray:
    n = grid * grid
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: num_masked(n, ratio)]] = True
    return mask


def block_mask(rng: np.random.Generator, grid: int, ratio: float, min_patches: int = 16,
               min_aspect: float = 0.3) -> np.ndarray:
    """BEiT-style: rectangles of random area and aspect ratio until the target count is met;
    the last rectangle is trimmed (or random patches added) so the count is exact."""
    n, target = grid * grid, num_masked(grid * grid, ratio)
    mask = np.zeros((grid, grid), dtype=bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    tries = 0
    while mask.sum() < target and tries < 100 * n:
        tries += 1
        left = target - int(mask.sum())
        area = rng.uniform(min(min_patches, left), max(min(min_patches, left), left))
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if not (0 < h <= grid and 0 < w <= grid):
            continue
        top, lft = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
        new = ~mask[top:top + h, lft:lft + w]
        if not new.any():
            continue
        ys, xs = np.nonzero(new)
        take = min(len(ys), left)  # keep the rectangle's first rows when it would overshoot
        mask[top + ys[:take], lft + xs[:take]] = True
    flat = mask.reshape(-1)
    short = target - int(flat.sum())
    if short > 0:  # rare: no rectangle fitted; fill at random
        flat[rng.choice(np.flatnonzero(~flat), short, replace=False)] = True
    return flat


def image_mask(rng: np.random.Generator, grid: int, cfg: MaskConfig) -> np.ndarray:
    """Boolean (grid*grid,) mask, True = masked (hidden from the student)."""
    if cfg.strategy == "block":
        return block_mask(rng, grid, cfg.ratio, cfg.block_min_patches, cfg.block_min_aspect)
    return random_mask(rng, grid, cfg.ratio)


@dataclass
class TextMask:
    tokens: torch.Tensor  # (L,) the encoder's input: chosen pieces replaced by random ones
    target: torch.Tensor  # (L,) bool: positions whose original piece is predicted
    use_mask_embedding: torch.Tensor  # (L,) bool: positions shown as the [MASK] embedding


def text_mask(rng: np.random.Generator, tokens: torch.Tensor, eot: int, cfg: TextMlmConfig,
              ordinary_ids: np.ndarray) -> TextMask:
    """Choose ``round(mask_ratio * pieces)`` (at least one) of the caption's pieces, i.e. the
    positions strictly between BOS and EOS. ``ordinary_ids``: ids a random replacement may take."""
    out = tokens.clone()
    target = torch.zeros_like(tokens, dtype=torch.bool)
    embed = torch.zeros_like(tokens, dtype=torch.bool)
    pieces = np.arange(1, int(eot))
    if len(pieces):
        k = max(1, int(round(cfg.mask_ratio * len(pieces))))
        chosen = rng.choice(pieces, k, replace=False)
        u = rng.random(k)
        target[chosen] = True
        as_mask = chosen[u < cfg.mask_token_prob]
        as_random = chosen[(u >= cfg.mask_token_prob)
                           & (u < cfg.mask_token_prob + cfg.random_token_prob)]
        embed[as_mask] = True
        if len(as_random):
            out[as_random] = torch.from_numpy(rng.choice(ordinary_ids, len(as_random)))
    return TextMask(out, target, embed)


@dataclass
class Masking:
    """What the pipeline draws for each sample; ``None`` parts are not drawn."""
    grid: int  # patches per side
    image: "MaskConfig | None" = None
    text: "TextMlmConfig | None" = None


def masking_for(image_size: int, patch_size: int, objective) -> "Masking | None":
    """What the pipeline draws for ``objective`` (its ``Passes``): image masks when a term reads
    the masked student pass, caption masks for MLM; None when neither."""
    passes = objective.passes
    if not passes.masked_image and not passes.masked_caption:
        return None
    return Masking(grid=image_size // patch_size,
                   image=objective.mask if passes.masked_image else None,
                   text=objective.text_mlm if passes.masked_caption else None)


def ordinary_token_ids(tokenizer) -> np.ndarray:
    """Every id except BOS/EOS/PAD (random replacements never fake a special token)."""
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    return np.array([i for i in range(tokenizer.vocab_size) if i not in special], dtype=np.int64)


def batch_masks(masking: Masking, seeds: list[int], tokens: torch.Tensor, eot: torch.Tensor,
                ordinary_ids: np.ndarray) -> dict[str, torch.Tensor]:
    """Masks for a batch; sample i's masks depend on ``seeds[i]`` alone."""
    out: dict[str, torch.Tensor] = {}
    rngs = [np.random.default_rng(s) for s in seeds]
    if masking.image is not None:
        out["image_mask"] = torch.from_numpy(np.stack(
            [image_mask(r, masking.grid, masking.image) for r in rngs]))
        out["keep_index"], out["masked_index"] = split_indices(out["image_mask"])
    if masking.text is not None:
        masks = [text_mask(r, tokens[i], int(eot[i]), masking.text, ordinary_ids)
                 for i, r in enumerate(rngs)]
        out["mlm_tokens"] = torch.stack([m.tokens for m in masks])
        out["mlm_target"] = torch.stack([m.target for m in masks])
        out["mlm_embed"] = torch.stack([m.use_mask_embedding for m in masks])
        out["mlm_index"], out["mlm_valid"] = mlm_indices(out["mlm_target"])
    return out


def split_indices(mask_BN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible patch indices (B, K), masked patch indices (B, M)), each ascending; every row
    of ``mask`` must hold the same number of masked patches. It reads the mask's values: the
    data pipeline calls it on the host, so the training step never waits for the device."""
    order = torch.argsort(mask_BN.to(torch.int8), dim=1, stable=True)
    m = int(mask_BN[0].sum())
    return order[:, : mask_BN.shape[1] - m], order[:, mask_BN.shape[1] - m:]


def mlm_indices(target_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen caption positions as (index (B, K), valid (B, K)): row i lists its chosen
    positions in ascending order, then position 0 (never chosen) with ``valid`` False up to K,
    the batch's largest count (at least 1). Gathering at fixed-shape indices keeps the
    device's output shapes independent of the data (a boolean-mask index makes the host wait
    for the device to count). Called on the host, by the data pipeline."""
    counts = target_BL.sum(1)
    k = max(1, int(counts.max())) if target_BL.numel() else 1
    # Chosen positions first (stable: ascending), the rest after.
    order = torch.argsort((~target_BL).to(torch.int8), dim=1, stable=True)[:, :k]
    valid = torch.arange(k)[None] < counts[:, None]
    return torch.where(valid, order, 0), valid
