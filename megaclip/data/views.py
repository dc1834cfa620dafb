"""Image views: the training crop (random resized crop), SILC's multi-crop views (global and
local crops with DINO's photometric augmentation) and evaluation.

Training views are uint8 (3, S, S); ``to_device`` (engine/step.py) normalises them on the device
with data.mean / data.std, so workers do a quarter of the copying and none of the float work.
Every view depends on its sample's seed alone, so a resumed run draws the same crops: the
training crop draws from its own generator, the multi-crop views from torch's global one inside
``seeded``."""
from __future__ import annotations

import math
from typing import Optional

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from megaclip.objectives.config import LocalGlobalConfig

Box = tuple[int, int, int, int]  # top, left, height, width in the source image


class TrainCrop:
    """torchvision's ``RandomResizedCrop`` (bilinear, antialiased) to uint8 (3, S, S), its box
    drawn as torchvision draws it but from a generator seeded with the sample's seed: the same
    crop ``seeded(v2.RandomResizedCrop)`` gives, without touching torch's global generator.

    The box is drawn from the image's header size, before decoding, so a JPEG much larger than
    the crop can be decoded at 1/2, 1/4 or 1/8 scale (``draft_size``) and still give the crop at
    least S pixels each way."""

    def __init__(self, image_size: int, scale: tuple, ratio: tuple = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = image_size, tuple(scale), tuple(ratio)
        self.log_ratio = torch.log(torch.tensor(self.ratio))  # float32, as torchvision
        self.gen = torch.Generator()

    def box(self, width: int, height: int, seed: int) -> Box:
        g = self.gen.manual_seed(seed)
        area = height * width
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(*self.scale, generator=g).item()
            aspect = torch.exp(torch.empty(1).uniform_(self.log_ratio[0], self.log_ratio[1],
                                                       generator=g)).item()
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
                j = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
                return i, j, h, w
        in_ratio = width / height  # torchvision's fallback: the central crop
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def draft_size(self, width: int, height: int, box: Box) -> Optional[tuple[int, int]]:
        """The smallest decoded size that keeps ``box`` at least S pixels each way (PIL's
        ``Image.draft`` picks the largest JPEG scale 1/2^k at or above it); None when only a
        full decode would."""
        _, _, h, w = box
        k = min(w, h) / self.size
        return (math.ceil(width / k), math.ceil(height / k)) if k >= 2 else None

    def __call__(self, image: Image.Image, box: Box, source: tuple[int, int]) -> torch.Tensor:
        """The crop ``box`` (drawn at ``source`` = (width, height)) of ``image``, which may be
        a scaled-down decode of the source."""
        top, left, h, w = box
        if image.size != source:
            sx, sy = image.width / source[0], image.height / source[1]
            top, left = int(top * sy), int(left * sx)
            h, w = max(1, min(round(h * sy), image.height - top)), max(1, min(round(w * sx),
                                                                              image.width - left))
        return TF.resized_crop(TF.pil_to_tensor(image), top, left, h, w, [self.size, self.size],
                               antialias=True)


_MEAN_STD: dict = {}  # (mean, std, device) -> the two (3, 1, 1) tensors on that device


def _mean_std(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` on ``device``, copied there once: a copy from host memory at every
    batch would make the host wait for the device each time."""
    key = (tuple(float(x) for x in mean), tuple(float(x) for x in std), torch.device(device))
    if key not in _MEAN_STD:
        _MEAN_STD[key] = tuple(torch.tensor(v, dtype=torch.float32, device=device).view(3, 1, 1)
                               for v in key[:2])
    return _MEAN_STD[key]


def normalise(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 views (..., 3, H, W) -> float32 ``(x / 255 - mean) / std``, as torchvision's
    ``ToDtype(float32, scale=True)`` + ``Normalize`` compute it (same operations and order)."""
    m, s = _mean_std(mean, std, images.device)
    return images.to(torch.float32).mul_(1.0 / 255).sub_(m).div_(s)


def train_transform(image_size: int, crop_scale: tuple, mean: tuple, std: tuple,
                    crop_ratio: tuple = (3 / 4, 4 / 3)) -> v2.Compose:
    """The normalised float view ``seeded`` gives; the loader uses ``TrainCrop`` (same crop,
    uint8, normalised on the device)."""
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
    """``image -> (globals (G, 3, S, S), locals (L, 3, s, s))``, uint8 views (``normalise``).

    Global view 0 is blurred always and view 1 with probability 0.1 and solarised with 0.2
    (further global views as view 1); local views are blurred with probability 0.5 (DINO). The
    blur's sigma range, (0.1, 2.0) at 224 px in DINO, scales with the global size."""

    def __init__(self, image_size: int, cfg: LocalGlobalConfig,
                 crop_ratio: tuple = (3 / 4, 4 / 3)):
        self.global_crops, self.local_crops = cfg.global_crops, cfg.local_crops
        self.image_size, self.local_size = image_size, cfg.local_size
        sigma = (0.1 * image_size / 224, 2.0 * image_size / 224)

        def view(size: int, scale: tuple, blur_p: float, solarize_p: float) -> v2.Compose:
            crop = v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(crop_ratio),
                                        antialias=True)
            return v2.Compose([crop, *_photometric(cfg.photometric, blur_p, solarize_p, sigma)])

        self.globals = [view(image_size, cfg.global_scale, 1.0, 0.0)]
        self.globals += [view(image_size, cfg.global_scale, 0.1, 0.2)] * (cfg.global_crops - 1)
        self.local = view(cfg.local_size, cfg.local_scale, 0.5, 0.0)
        self.to_image = v2.ToImage()

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.to_image(image)
        globals_ = torch.stack([t(x) for t in self.globals])
        if not self.local_crops:
            return globals_, torch.empty(0, 3, self.local_size, self.local_size,
                                         dtype=torch.uint8)
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
    """Apply ``transform`` with torch's global CPU generator set to ``seed`` and restored after,
    so a sample's view depends on its seed alone (in a worker process or in the main one).
    Only the CPU generator: ``torch.manual_seed`` would also seed every accelerator backend,
    which costs more than the crop (0.16 ms a call)."""
    gen = torch.default_generator
    state = gen.get_state()
    gen.manual_seed(seed)
    try:
        return transform(image)
    finally:
        gen.set_state(state)
