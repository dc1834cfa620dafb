"""A procedurally generated image-caption set: shapes of given colours, sizes and counts at
random positions, with captions that describe them. Deterministic from a seed; learnable in
minutes.

The held-out evaluation split holds one kind of object per image; its zero-shot classes are the
(colour, shape) pairs, named by prompts such as "a photo of a red circle.", and each image
carries its object mask (``mask.npy``: 0 background, 1 + class on the object) for dense probes.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 205, 30), "purple": (140, 50, 180), "orange": (245, 135, 25)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.15, "large": 0.25}  # half-extent as a fraction of the image side
# Where objects of one kind are scattered: anywhere, or one half when two kinds share an image.
# Positions are not named in captions: with colour, size and count alone a batch of 64 can be
# told apart, so the model would never need to learn shape.
REGIONS = {"anywhere": ((0.22, 0.78), (0.22, 0.78)), "left": ((0.2, 0.4), (0.2, 0.8)),
           "right": ((0.6, 0.8), (0.2, 0.8))}
COUNTS = {1: "one", 2: "two", 3: "three"}
TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.", "one {} on a plain background.")
CLASSNAMES = [f"{c} {s}" for c in COLORS for s in SHAPES]
# Prompts of mask label 0 (the background) for zero-shot segmentation.
BACKGROUND_TEMPLATES = ("a plain grey background.", "an empty background.")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        t = r / 3
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise ValueError(shape)


def _plural(rng: random.Random, count: int, size: str, color: str, shape: str) -> str:
    noun = shape + ("es" if shape == "cross" and count > 1 else "s" if count > 1 else "")
    article = COUNTS[count] if count > 1 else rng.choice(["a", "one"])
    return f"{article} {size} {color} {noun}"


def render(rng: random.Random, side: int, objects: list[dict], mask: Image.Image | None = None
           ) -> Image.Image:
    """Objects: dicts with shape, color, size, region, count (and ``label``, the value their
    pixels get in ``mask``, an "L" image of the same size, when one is given)."""
    shade = rng.randint(200, 245)
    img = Image.new("RGB", (side, side), (shade, shade, shade + rng.randint(-10, 10)))
    draw = ImageDraw.Draw(img)
    mask_draw = ImageDraw.Draw(mask) if mask is not None else None
    for obj in objects:
        (x0, x1), (y0, y1) = REGIONS[obj["region"]]
        r = SIZES[obj["size"]] * side * rng.uniform(0.85, 1.15)
        base = COLORS[obj["color"]]
        for _ in range(obj["count"]):
            fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in base)
            cx, cy = rng.uniform(x0, x1) * side, rng.uniform(y0, y1) * side
            _draw_shape(draw, obj["shape"], cx, cy, r, fill)
            if mask_draw is not None:
                _draw_shape(mask_draw, obj["shape"], cx, cy, r, obj["label"])
    return img


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def train_sample(seed: int, index: int, side: int) -> dict:
    rng = random.Random(f"{seed}-train-{index}")
    regions = ["anywhere"] if rng.random() < 0.7 else ["left", "right"]
    objects = [dict(shape=rng.choice(SHAPES), color=rng.choice(list(COLORS)),
                    size=rng.choice(list(SIZES)), region=r, count=rng.choice(list(COUNTS)))
               for r in regions]
    img = render(rng, side, objects)
    parts = [_plural(rng, o["count"], o["size"], o["color"], o["shape"]) for o in objects]
    lead = rng.choice(["", "a photo of ", "an image of ", "there are "])
    caption = lead + " and ".join(parts) + "."
    return {"__key__": f"train{index:08d}", "jpg": _jpeg(img), "txt": caption}


def eval_sample(seed: int, index: int, side: int) -> dict:
    rng = random.Random(f"{seed}-eval-{index}")
    label = index % len(CLASSNAMES)
    color, shape = CLASSNAMES[label].split(" ")
    obj = dict(shape=shape, color=color, size=rng.choice(list(SIZES)), region="anywhere", count=1,
               label=label + 1)
    mask = Image.new("L", (side, side), 0)
    img = render(rng, side, [obj], mask)
    caption = f"{_plural(rng, 1, obj['size'], color, shape)}."
    buf = io.BytesIO()
    np.save(buf, np.array(mask, dtype=np.int64))
    # mask.npy: per pixel, 0 for the background and 1 + the class index on the object.
    return {"__key__": f"eval{index:08d}", "jpg": _jpeg(img), "txt": caption, "cls": str(label),
            "mask.npy": buf.getvalue()}


def iter_split(split: str, count: int, seed: int, side: int) -> Iterator[dict]:
    make = train_sample if split == "train" else eval_sample
    for i in range(count):
        yield make(seed, i, side)


def write_classes(path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"classnames": CLASSNAMES, "templates": list(TEMPLATES),
                   "background": list(BACKGROUND_TEMPLATES)}, f, indent=1)


def chance_accuracy() -> float:
    return 1.0 / len(CLASSNAMES)


def default_side(image_size: int) -> int:
    """Stored images are a little larger than the model's input, so crops have room."""
    return int(math.ceil(image_size * 1.25))
