"""Evaluation sets from a user's labelled images: an ImageFolder tree (one subfolder per class)
or a labels CSV, split deterministically into named parts, with class names, prompt templates
and optional per-pixel masks (for dense probes). Written as WebDataset shards that
``data/eval_set.EvalSet`` reads: ``jpg``/``png`` image, ``txt`` caption, ``cls`` label and,
with masks, ``mask.npy`` (an integer array of the image's height x width)."""
from __future__ import annotations

import csv
import io
import json
import os
import random
from typing import Iterable, Optional

import numpy as np

from megaclip.config import DataConfig
from megaclip.data.decode import BadSample, load_image, open_bytes
from megaclip.data.eval_set import check_templates
from megaclip.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# What an image file may be decoded as (nothing else is handed to a decoder), and its pixel
# limit: training's defaults (data.image_formats, data.max_image_pixels), plus BMP, stored as PNG.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
MAX_PIXELS = DataConfig.max_image_pixels
MASK_EXTENSIONS = (".png", ".npy")
# CLIP's 7-template ensemble for ImageNet (Radford et al., 2021, notebook "prompt engineering").
DEFAULT_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                     "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                     "a photo of the small {}.")


def folder_items(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class folder names sorted, [(image path, label)]) of an ImageFolder tree."""
    if not os.path.isdir(root):
        raise UserError(f"image folder '{root}' does not exist")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise UserError(f"'{root}' has no class subfolders (ImageFolder layout: root/<class>/*.jpg)")
    items = [(os.path.join(root, c, f), label) for label, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(root, c)))
             if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not items:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under '{root}'")
    return classes, items


def csv_items(path: str, root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names in first-seen order, [(image path, label)]) of a CSV with a header holding
    ``image`` (or path/file/filename) and ``label`` (or class) columns; paths relative to root."""
    if not os.path.isfile(path):
        raise UserError(f"labels file '{path}' does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip().lower() for h in reader.fieldnames or []]
        image_col = next((h for h in ("image", "path", "file", "filename") if h in header), None)
        label_col = next((h for h in ("label", "class", "category") if h in header), None)
        if image_col is None or label_col is None:
            raise UserError(f"{path}: the header needs an image column (image|path|file|filename)"
                            f" and a label column (label|class|category); it has {header}")
        names = {h.strip().lower(): h for h in reader.fieldnames}
        rows = [((r.get(names[image_col]) or "").strip(), (r.get(names[label_col]) or "").strip())
                for r in reader]
    empty = [i + 2 for i, (p, label) in enumerate(rows) if not p or not label]
    if not rows or empty:
        raise UserError(f"{path}: " + (f"rows {empty[:5]} lack an image or a label" if rows
                                        else "no rows under the header"))
    classes: list[str] = []
    for _, label in rows:
        if label not in classes:
            classes.append(label)
    return classes, [(os.path.join(root, p), classes.index(label)) for p, label in rows]


def read_classnames(path: Optional[str], folders: list[str]) -> list[str]:
    """Readable class names: a file of one name per line (in label order) or a JSON object
    {folder: name}; by default the folder names with _ and - as spaces."""
    if not path:
        return [f.replace("_", " ").replace("-", " ") for f in folders]
    if not os.path.isfile(path):
        raise UserError(f"class names file '{path}' does not exist")
    text = open(path).read()
    if path.endswith(".json"):
        mapping = json.loads(text)
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise UserError(f"{path} names no class for {missing[:5]}")
        return [mapping[f] for f in folders]
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != len(folders):
        raise UserError(f"{path} has {len(names)} names for {len(folders)} classes")
    return names


def read_templates(path: Optional[str]) -> list[str]:
    """Prompt templates, one per line with ``{}`` where the class name goes."""
    if not path:
        return list(DEFAULT_TEMPLATES)
    if not os.path.isfile(path):
        raise UserError(f"templates file '{path}' does not exist")
    templates = [line.strip() for line in open(path) if line.strip()]
    if not templates:
        raise UserError(f"{path}: no templates (one per line, with {{}} for the class name)")
    check_templates(templates, path)
    return templates


def split_items(items: list, fractions: dict[str, float], seed: int) -> dict[str, list]:
    """Items per split: each class is shuffled (seeded) and cut by the fractions (boundaries
    rounded half up), so every split holds every class in proportion."""
    by_class: dict[int, list] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    out: dict[str, list] = {name: [] for name in fractions}
    for label, members in sorted(by_class.items()):
        random.Random(f"{seed}-{label}").shuffle(members)
        start, cumulative, total = 0, 0.0, sum(fractions.values())
        for name, frac in fractions.items():
            cumulative += frac / total
            end = min(len(members), int(len(members) * cumulative + 0.5))
            out[name].extend(members[start:end])
            start = end
    return out


def find_mask(masks: Optional[str], image_path: str, root: str) -> Optional[str]:
    """The mask beside an image's relative path under ``masks`` (same stem, .png or .npy)."""
    if not masks:
        return None
    stem = os.path.splitext(os.path.relpath(image_path, root))[0]
    for ext in MASK_EXTENSIONS:
        candidate = os.path.join(masks, stem + ext)
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f"no mask for {image_path}: expected {os.path.join(masks, stem)}.png or .npy")


def read_mask(path: str, size: tuple[int, int], classes: int) -> np.ndarray:
    """Per-pixel labels: 0 the background, 1 + class index on a class, 255 (or -1) ignored."""
    try:
        if path.endswith(".npy"):
            mask = np.load(path, allow_pickle=False)
        else:
            with open(path, "rb") as f:
                mask = np.array(load_image(open_bytes(f.read(), MAX_PIXELS, ("PNG",)), None,
                                           convert=False))
    except BadSample as e:
        raise UserError(f"mask {path} cannot be read: {e}") from None
    except Exception as e:  # noqa: BLE001 - numpy and PIL raise many types
        raise UserError(f"mask {path} cannot be read: {e}") from None
    if mask.ndim != 2 or mask.shape != (size[1], size[0]):
        raise UserError(f"mask {path} is {mask.shape}; its image is {size[1]}x{size[0]} (h x w)")
    mask = np.where(mask == 255, -1, mask.astype(np.int64))
    bad = mask[(mask < -1) | (mask > classes)]
    if bad.size:
        raise UserError(f"mask {path} holds {int(bad[0])}: labels are 0 (background), 1..{classes} "
                        f"(1 + class index) and 255 (ignored)")
    return mask


def samples(items: Iterable[tuple[str, int]], classnames: list[str], templates: list[str],
            root: str, masks: Optional[str], prefix: str) -> Iterable[dict]:
    """WebDataset samples; the caption is the first template filled with the class name."""
    for i, (path, label) in enumerate(items):
        if not os.path.isfile(path):
            raise UserError(f"image {path} does not exist")
        with open(path, "rb") as f:
            raw = f.read()
        try:  # the same limits as training's reader, checked before any pixel is decoded
            img = load_image(open_bytes(raw, MAX_PIXELS, IMAGE_FORMATS))
            fmt, size = img.format, img.size
        except BadSample as e:
            raise UserError(f"image {path} cannot be used: {e}") from None
        sample = {"__key__": f"{prefix}{i:08d}", "txt": templates[0].format(classnames[label]),
                  "cls": str(label)}
        if fmt in ("JPEG", "PNG", "WEBP"):
            sample["jpg" if fmt == "JPEG" else fmt.lower()] = raw
        else:  # stored losslessly in a format training decodes
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            sample["png"] = buf.getvalue()
        mask_path = find_mask(masks, path, root)
        if mask_path:
            buf = io.BytesIO()
            np.save(buf, read_mask(mask_path, size, len(classnames)))
            sample["mask.npy"] = buf.getvalue()
        yield sample
