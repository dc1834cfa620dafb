"""The held-out evaluation split: images with captions and class labels, plus the class prompts."""
from __future__ import annotations

import json
import os
import string
from typing import Optional

import torch

from megaclip.config import DataConfig
from megaclip.data.decode import BadSample, decode_caption, decode_image
from megaclip.data.shards import iter_shard, shard_list
from megaclip.data.views import eval_transform
from megaclip.errors import UserError


def template_problem(template, placeholder: bool = True) -> Optional[str]:
    """Why ``template`` cannot be a prompt template (None if it can): the class name goes in by
    ``template.format(name)``, so the only fields allowed are ``{}`` (once) or ``{0}``, without
    attribute or index access, conversion or format spec, and other braces are doubled;
    ``placeholder``: it must name the class (background prompts need not)."""
    if not isinstance(template, str):
        return "not a string"
    try:
        fields = [(f, conv, spec) for _, f, spec, conv in string.Formatter().parse(template)
                  if f is not None]
    except ValueError as e:
        return f"{e} (write a literal brace as {{{{ or }}}})"
    other = [f for f, conv, spec in fields if f not in ("", "0") or conv or spec]
    if other:
        return (f"field {{{other[0]}}} is not the class name's {{}} or {{0}} (a literal brace "
                f"is written {{{{ or }}}})" if other[0] not in ("", "0")
                else "the class name's field takes no conversion or format spec")
    auto, manual = sum(f == "" for f, _, _ in fields), sum(f == "0" for f, _, _ in fields)
    if auto > 1 or (auto and manual):
        return "the class name goes in once as {}, or as {0} wherever it is repeated"
    if placeholder and not fields:
        return "no {} where the class name goes"
    return None


def check_templates(templates: list, where: str, placeholder: bool = True) -> None:
    """Every template of ``where`` usable (``template_problem``), else an error naming it."""
    for t in templates:
        problem = template_problem(t, placeholder)
        if problem:
            raise UserError(f"{where}: template {t!r}: {problem}")


class EvalSet:
    """Holds the split's raw samples (it is small) and decodes the ones a rank asks for."""

    def __init__(self, shards: str, classes_file: str, image_size: int, mean: tuple, std: tuple,
                 image_keys: tuple = ("jpg", "jpeg", "png", "webp"), caption_key: str = "txt",
                 max_pixels: int = DataConfig.max_image_pixels,
                 formats: tuple = DataConfig.image_formats,
                 max_member_bytes: int = DataConfig.max_member_bytes):
        """``max_pixels``, ``formats`` and ``max_member_bytes``: the limits of training's reader
        (``data.max_image_pixels``, ``data.image_formats``, ``data.max_member_bytes``)."""
        if not os.path.isfile(classes_file):
            raise UserError(f"eval classes file '{classes_file}' does not exist")
        with open(classes_file) as f:
            meta = json.load(f)
        if not meta.get("classnames") or not meta.get("templates"):
            raise UserError(f"{classes_file} needs non-empty 'classnames' and 'templates'")
        self.classnames: list[str] = list(meta["classnames"])
        self.templates: list[str] = list(meta["templates"])
        check_templates(self.templates, f"{classes_file} 'templates'")
        check_templates(meta.get("background", []), f"{classes_file} 'background'",
                        placeholder=False)
        needed = frozenset((*image_keys, caption_key, "cls", "mask.npy"))
        self.samples = [s for url in shard_list(shards)
                        for s in iter_shard(url, needed, max_member_bytes)]
        if not self.samples:
            raise UserError(f"eval shards '{shards}' hold no samples")
        self.image_keys, self.caption_key = tuple(image_keys), caption_key
        self.max_pixels, self.formats = max_pixels, tuple(formats)
        self.transform = eval_transform(image_size, mean, std)
        self.image_size = image_size
        self.transform_mean, self.transform_std = tuple(mean), tuple(std)
        self.background_templates: list[str] = list(meta.get("background", []))
        self.labels = torch.tensor([int(s["cls"]) for s in self.samples])
        try:
            self.captions = [decode_caption(s, caption_key) for s in self.samples]
        except BadSample as e:
            raise UserError(f"eval shards '{shards}': {e}") from None

    def __len__(self) -> int:
        return len(self.samples)

    def images(self, indices: list[int]) -> torch.Tensor:
        out = []
        for i in indices:
            try:
                img = decode_image(self.samples[i], self.image_keys, self.max_pixels,
                                   self.formats)
            except BadSample as e:
                raise UserError(f"eval sample {self.samples[i]['__key__']}: {e}") from None
            out.append(self.transform(img))
        return torch.stack(out)

    @property
    def has_masks(self) -> bool:
        return all("mask.npy" in s for s in self.samples)

    def masks(self, indices: list[int]) -> torch.Tensor:
        """Per-pixel labels (B, S, S) int64, cut like the images (resize of the shorter side,
        nearest, then the centre crop)."""
        import io

        import numpy as np
        from torchvision import tv_tensors
        from torchvision.transforms import v2
        cut = v2.Compose([v2.Resize(self.image_size), v2.CenterCrop(self.image_size)])
        out = []
        for i in indices:
            mask = torch.from_numpy(np.load(io.BytesIO(self.samples[i]["mask.npy"])))
            out.append(cut(tv_tensors.Mask(mask[None]))[0].long())
        return torch.stack(out)

    def prompts(self) -> list[str]:
        """Class-major: prompt ``c * T + t`` is template t of class c."""
        return [t.format(c) for c in self.classnames for t in self.templates]
