"""Pictures for TensorBoard, where people look rather than read: a few training samples with
their patch masks and crops, and patch-text similarity maps of held-out images for their own
class prompts (as in the MaskCLIP slides). Image grids (3, H, W) in [0, 1]."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid


def denormalise(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """Views in [0, 1]: uint8 ones (the training loader's) scaled, normalised ones undone."""
    if not images.is_floating_point():
        return images.cpu().float() / 255
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float().cpu() * s + m).clamp(0, 1)


def training_samples(batch: dict, mean: tuple, std: tuple, count: int = 4) -> torch.Tensor:
    """One row per sample: the image, the image with its masked patches greyed out (MaskCLIP),
    then its other global and its local crops (SILC), all at the image's size."""
    images = denormalise(batch["images"][:count], mean, std)
    n, _, side, _ = images.shape
    columns = [images]
    if "image_mask" in batch:
        masked = batch["image_mask"][:n].float()
        grid = int(math.isqrt(masked.shape[1]))
        cover = F.interpolate(masked.view(n, 1, grid, grid), size=side, mode="nearest")
        columns.append(images * (1 - cover) + 0.5 * cover)
    for key in ("views", "local_views"):
        if key in batch and batch[key].shape[1]:
            views = batch[key][:n]
            for v in range(views.shape[1]):
                crop = denormalise(views[:, v], mean, std)
                columns.append(F.interpolate(crop, size=side, mode="bilinear", align_corners=False))
    rows = torch.stack(columns, dim=1).flatten(0, 1)  # sample-major
    return make_grid(rows, nrow=len(columns), padding=2, pad_value=1.0)


def heat(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) in [0, 1] -> (N, 3, H, W): black-red-yellow-white."""
    m = maps.clamp(0, 1)[:, None]
    return torch.cat([(3 * m).clamp(0, 1), (3 * m - 1).clamp(0, 1), (3 * m - 2).clamp(0, 1)], 1)


@torch.no_grad()
def similarity_maps(model, data, tokenizer, device: torch.device, dtype: torch.dtype,
                    count: int = 4, class_embeddings: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """Each of the first ``count`` held-out images beside the similarity of its patches (through
    the image projection) to its class's prompt embedding, scaled to [0, 1] per image. Every
    rank runs the same forwards (ZeRO-3 gathers need them all)."""
    from megaclip.eval.probes import class_text_embeddings
    idx = list(range(min(count, len(data))))
    pixels = data.images(idx)
    tokens = model.visual(pixels.to(device, dtype))[1]
    patches = F.normalize(model.visual.proj(tokens[:, 1:]).float(), dim=-1)
    if class_embeddings is None:
        class_embeddings = class_text_embeddings(model, tokenizer, data.classnames,
                                                 data.templates, len(data.templates), device)
    target = class_embeddings[data.labels[idx].to(class_embeddings.device)].to(patches.device)
    sims = (patches @ target[:, :, None]).squeeze(-1).cpu()  # (n, N)
    grid = int(math.isqrt(sims.shape[1]))
    lo, hi = sims.min(1, keepdim=True).values, sims.max(1, keepdim=True).values
    scaled = ((sims - lo) / (hi - lo).clamp_min(1e-6)).view(-1, 1, grid, grid)
    side = pixels.shape[-1]
    maps = F.interpolate(scaled, size=side, mode="bilinear", align_corners=False)[:, 0]
    images = denormalise(pixels, data.transform_mean, data.transform_std)
    rows = torch.stack([images, heat(maps)], dim=1).flatten(0, 1)
    return make_grid(rows, nrow=2, padding=2, pad_value=1.0)
