"""Decoding one raw WebDataset sample into (image, caption), with every way it can be bad named."""
from __future__ import annotations

import io
import logging
import warnings
from collections import Counter
from typing import Optional

from PIL import Image

log = logging.getLogger("megaclip.data")

# Our own pixel limit is checked from the header before any pixel is decoded; PIL's global one
# would turn the same case into an exception half-way through.
Image.MAX_IMAGE_PIXELS = None

BAD_KINDS = ("missing_image", "missing_caption", "caption_not_utf8", "image_too_large",
             "undecodable_image")


class BadSample(Exception):
    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def decode_caption(sample: dict, key: str) -> str:
    raw = sample.get(key)
    if raw is None:
        raise BadSample("missing_caption", f"no '.{key}' member")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as e:
        raise BadSample("caption_not_utf8", str(e)) from None
    text = text.strip()
    if not text:
        raise BadSample("missing_caption", "empty caption")
    return text


def decode_image(sample: dict, keys: tuple, max_pixels: int) -> Image.Image:
    raw: Optional[bytes] = next((sample[k] for k in keys if k in sample), None)
    if raw is None:
        raise BadSample("missing_image", f"none of .{', .'.join(keys)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(raw))
            w, h = img.size  # header only
            if w * h > max_pixels:
                raise BadSample("image_too_large", f"{w}x{h} > {max_pixels} pixels")
            img.load()
            return img.convert("RGB")
    except BadSample:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise BadSample("undecodable_image", f"{type(e).__name__}: {e}") from None


class BadSampleLog:
    """Counts skipped samples by kind; describes the first few of them in the log."""

    def __init__(self, describe_first: int):
        self.counts: Counter = Counter()
        self.describe_first = describe_first

    def add(self, err: BadSample, sample: dict) -> None:
        self.counts[err.kind] += 1
        total = sum(self.counts.values())
        if total <= self.describe_first:
            log.warning("skipping sample %s from %s: %s", sample.get("__key__"),
                        sample.get("__url__"), err)
