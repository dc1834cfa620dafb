"""Image views: torchvision v2 transforms for training (random resized crop) and evaluation."""
from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2


def train_transform(image_size: int, crop_scale: tuple, mean: tuple, std: tuple,
                    crop_ratio: tuple = (3 / 4, 4 / 3)) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), ratio=tuple(crop_ratio),
                             antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


def eval_transform(image_size: int, mean: tuple, std: tuple) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(image_size, antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


def seeded(transform: v2.Compose, image: Image.Image, seed: int) -> torch.Tensor:
    """Apply ``transform`` with torch's global generator set to ``seed`` and restored after, so a
    sample's view depends on its seed alone (in a worker process or in the main one)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)
