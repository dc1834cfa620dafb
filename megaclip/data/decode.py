"""Decoding one raw WebDataset sample into (image, caption), with every way it can be bad named."""
from __future__ import annotations

import io
import logging
import warnings
from collections import Counter
from typing import Optional

from PIL import Image

from megaclip.errors import UserError

log = logging.getLogger("megaclip.data")

# Our own pixel limit (data.max_image_pixels) is checked from the header before any pixel is
# decoded. PIL's own limit (Image.MAX_IMAGE_PIXELS) stays on: above twice it PIL refuses to open
# an image at all, which is counted as too large as well.

# "sample_error": anything else that went wrong with one sample (counted, never fatal: the
# stream replays exactly, so an error that ended the run would end every restart too).
BAD_KINDS = ("missing_image", "missing_caption", "caption_not_utf8", "image_too_large",
             "undecodable_image", "caption_too_long", "member_too_large", "sample_error",
             "malformed_json")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # PIL format names; EPS and the like never reach PIL


class BadSample(Exception):
    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def _oversize(sample: dict, keys: tuple) -> None:
    hit = [k for k in keys if k in sample.get("__oversize__", ())]
    if hit:
        why = ("takes its sample over data.max_sample_bytes"
               if hit[0] in sample.get("__sample_cap__", ()) else "is over data.max_member_bytes")
        raise BadSample("member_too_large", f"'.{hit[0]}' {why}")


def decode_caption(sample: dict, key: str, max_bytes: int = 1 << 62) -> str:
    _oversize(sample, (key,))
    raw = sample.get(key)
    if raw is None:
        raise BadSample("missing_caption", f"no '.{key}' member")
    if len(raw) > max_bytes:
        raise BadSample("caption_too_long", f"{len(raw)} bytes > data.max_caption_bytes")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as e:
        raise BadSample("caption_not_utf8", str(e)) from None
    text = text.strip()
    if not text:
        raise BadSample("missing_caption", "empty caption")
    return text


def decode_image(sample: dict, keys: tuple, max_pixels: int,
                 formats: tuple = IMAGE_FORMATS) -> Image.Image:
    """The first of ``keys`` the sample has, decoded as RGB if it is in one of ``formats``."""
    return load_image(open_image(sample, keys, max_pixels, formats))


def open_image(sample: dict, keys: tuple, max_pixels: int,
               formats: tuple = IMAGE_FORMATS) -> Image.Image:
    """The first of ``keys`` the sample has, its header read and its size checked; no pixel
    decoded yet (``load_image``)."""
    key = next((k for k in keys if k in sample or k in sample.get("__oversize__", ())), None)
    if key is None:
        raise BadSample("missing_image", f"none of .{', .'.join(keys)}")
    _oversize(sample, (key,))
    return open_bytes(sample[key], max_pixels, formats)


def open_bytes(raw: bytes, max_pixels: int, formats: tuple = IMAGE_FORMATS) -> Image.Image:
    """An encoded image opened as one of ``formats`` only (no other decoder, and no program
    such as Ghostscript, ever sees it), its header read and its size checked against
    ``max_pixels``; no pixel decoded yet (``load_image``). Every image megaclip reads, for
    training, evaluation or making datasets, is opened here."""
    if not isinstance(raw, (bytes, bytearray)):
        raise BadSample("undecodable_image", f"not bytes: {type(raw).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(raw), formats=[f.upper() for f in formats])
    except Image.DecompressionBombError as e:
        raise BadSample("image_too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise BadSample("undecodable_image", f"{type(e).__name__}: {e}") from None
    w, h = img.size  # header only
    if w * h > max_pixels:
        raise BadSample("image_too_large", f"{w}x{h} > {max_pixels} pixels")
    return img


def load_image(img: Image.Image, draft: Optional[tuple[int, int]] = None,
               convert: bool = True) -> Image.Image:
    """``img`` (from ``open_image``) decoded as RGB (in its own mode without ``convert``); a
    JPEG with a ``draft`` size is decoded at the smallest 1/2^k scale at or above it (libjpeg's
    DCT scaling: far less work)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if draft is not None and img.format == "JPEG":
                img.draft("RGB", draft)
            img.load()
            return img if img.mode == "RGB" or not convert else img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise BadSample("undecodable_image", f"{type(e).__name__}: {e}") from None


class BadSampleLog:
    """Counts skipped samples by kind and describes the first few in the log. ``max_in_a_row``
    unusable samples in a row, from at least ``MIN_SHARDS`` shards (a wrong ``data.caption_key``
    makes every sample unusable; one shard of GIFs only should not end the run), is an error
    naming the members the samples do have."""

    MIN_SHARDS = 3

    def __init__(self, describe_first: int, max_in_a_row: int = 0,
                 counts: Optional[dict] = None, in_a_row: int = 0, source: str = ""):
        self.source = source  # a source of data.sources: named in the error
        self.counts: Counter = Counter(counts or {})
        self.describe_first, self.max_in_a_row = describe_first, max_in_a_row
        self.in_a_row = in_a_row
        self.members: Counter = Counter()  # member extensions of the current run of bad samples
        self.shards: set = set()  # (up to MIN_SHARDS) shards of the current run

    def good(self) -> None:
        self.in_a_row = 0
        self.members.clear()
        self.shards.clear()

    def add(self, err: BadSample, sample: dict) -> None:
        self.counts[err.kind] += 1
        self.in_a_row += 1
        self.members.update([k for k in sample if not k.startswith("__")]
                            + list(sample.get("__unread__", ())))
        if len(self.shards) < self.MIN_SHARDS:
            self.shards.add(sample.get("__url__"))
        total = sum(self.counts.values())
        if total <= self.describe_first:
            log.warning("skipping sample %s from %s: %s", sample.get("__key__"),
                        sample.get("__url__"), err)
        if (self.max_in_a_row and self.in_a_row >= self.max_in_a_row
                and len(self.shards) >= self.MIN_SHARDS):
            detail = str(err).split(": ", 1)[1] if ": " in str(err) else str(err)
            have = ", ".join(k for k, _ in self.members.most_common()) or "no members"
            where = f"of source '{self.source}' " if self.source else ""
            keys = ("data.caption_key" if not self.source else
                    f"the caption keys of source '{self.source}' (data.sources)")
            raise UserError(
                f"{self.in_a_row} samples {where}in a row could not be used (data.max_bad_"
                f"samples_in_a_row); the last ({sample.get('__key__')} in "
                f"{sample.get('__url__')}): {detail}; samples have: {have}. Check {keys} and "
                f"data.image_keys")
