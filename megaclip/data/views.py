"""Image views: torchvision v2 transforms for training (random resized crop), SILC's multi-crop
views (global and local crops with DINO's photometric augmentation) and evaluation.

Every view is drawn from torch's global generator inside ``seeded``, so a sample's views depend
on its seed alone: a resumed run draws the same crops."""
from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.transforms import v2

from megaclip.objective_config import LocalGlobalConfig


def train_transform(image_size: int, crop_scale: tuple, mean: tuple, std: tuple,
                    crop_ratio: tuple = (3 / 4, 4 / 3)) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), ratio=tuple(crop_ratio),
                             antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


def _photometric(kind: str, blur_p: float, solarize_p: float, sigma: tuple) -> list:
    """DINO's per-view augmentation on a uint8 image (``kind``: see LocalGlobalConfig)."""
    ops: list = [v2.RandomHorizontalFlip(p=0.5)]
    if kind == "none":
        return ops
    if kind == "dino":
        ops += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2)]
    else:  # colour_safe: the hue and saturation of the image stay as the caption says
        ops += [v2.RandomApply([v2.ColorJitter(0.4, 0.4)], p=0.8)]
    if blur_p > 0:
        kernel = 2 * math.ceil(3 * sigma[1]) + 1
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=sigma)], p=blur_p))
    if kind == "dino" and solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    return ops


class MultiCrop:
    """``image -> (globals (G, 3, S, S), locals (L, 3, s, s))``, normalised float views.

    Global view 0 is blurred always and view 1 with probability 0.1 and solarised with 0.2
    (further global views as view 1); local views are blurred with probability 0.5 (DINO). The
    blur's sigma range, (0.1, 2.0) at 224 px in DINO, scales with the global size."""

    def __init__(self, image_size: int, cfg: LocalGlobalConfig, mean: tuple, std: tuple,
                 crop_ratio: tuple = (3 / 4, 4 / 3)):
        self.global_crops, self.local_crops = cfg.global_crops, cfg.local_crops
        self.image_size, self.local_size = image_size, cfg.local_size
        sigma = (0.1 * image_size / 224, 2.0 * image_size / 224)
        finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]

        def view(size: int, scale: tuple, blur_p: float, solarize_p: float) -> v2.Compose:
            crop = v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(crop_ratio),
                                        antialias=True)
            return v2.Compose([crop, *_photometric(cfg.photometric, blur_p, solarize_p, sigma),
                               *finish])

        self.globals = [view(image_size, cfg.global_scale, 1.0, 0.0)]
        self.globals += [view(image_size, cfg.global_scale, 0.1, 0.2)] * (cfg.global_crops - 1)
        self.local = view(cfg.local_size, cfg.local_scale, 0.5, 0.0)
        self.to_image = v2.ToImage()

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.to_image(image)
        globals_ = torch.stack([t(x) for t in self.globals])
        if not self.local_crops:
            return globals_, torch.empty(0, 3, self.local_size, self.local_size)
        return globals_, torch.stack([self.local(x) for _ in range(self.local_crops)])


def eval_transform(image_size: int, mean: tuple, std: tuple) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(image_size, antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


def seeded(transform, image: Image.Image, seed: int):
    """Apply ``transform`` with torch's global generator set to ``seed`` and restored after, so a
    sample's view depends on its seed alone (in a worker process or in the main one)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)
