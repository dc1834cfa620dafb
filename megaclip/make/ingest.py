"""Turning an image folder plus a captions file into validated WebDataset samples."""
from __future__ import annotations

import csv
import json
import os
from collections import Counter
from typing import Iterator


from megaclip.data.decode import BadSample, load_image, open_bytes
from megaclip.errors import UserError

IMAGE_COLUMNS = ("image", "file", "filename", "path", "image_path")
CAPTION_COLUMNS = ("caption", "text", "txt", "title")
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def _pick(columns: list[str], wanted: tuple, given: str | None, what: str, path: str) -> str:
    if given:
        if given not in columns:
            raise UserError(f"{path} has no column '{given}' (columns: {', '.join(columns)})")
        return given
    for c in wanted:
        if c in columns:
            return c
    raise UserError(f"{path}: no {what} column among {', '.join(columns)}; "
                    f"name one with --{what}-column")


def read_captions(path: str, image_col: str | None = None, caption_col: str | None = None
                  ) -> Iterator[tuple[str, str]]:
    """(image path relative to the folder, caption) rows of a CSV, TSV or JSONL file."""
    if not os.path.isfile(path):
        raise UserError(f"captions file '{path}' does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".tsv", ".jsonl"):
        raise UserError(f"captions file '{path}' must be .csv, .tsv or .jsonl")
    with open(path, newline="", encoding="utf-8") as f:
        if ext == ".jsonl":
            rows = (json.loads(line) for line in f if line.strip())
            first = next(rows, None)
            if first is None:
                return
            ic = _pick(list(first), IMAGE_COLUMNS, image_col, "image", path)
            cc = _pick(list(first), CAPTION_COLUMNS, caption_col, "caption", path)
            for row in [first, *rows]:
                yield str(row.get(ic, "")), str(row.get(cc) or "")
            return
        reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
        ic = _pick(reader.fieldnames or [], IMAGE_COLUMNS, image_col, "image", path)
        cc = _pick(reader.fieldnames or [], CAPTION_COLUMNS, caption_col, "caption", path)
        for row in reader:
            yield row[ic] or "", row[cc] or ""


def validate_image(data: bytes, max_pixels: int) -> str:
    """Return the file extension for an image that training can decode (JPEG, PNG, WebP, under
    ``max_pixels``), opened with the same limits as training's reader: no other decoder sees
    it; raise BadSample otherwise."""
    img = open_bytes(data, max_pixels, tuple(_EXT))
    fmt = img.format
    load_image(img)
    return _EXT[fmt]


def folder_samples(folder: str, rows: Iterator[tuple[str, str]], max_pixels: int,
                   skipped: Counter) -> Iterator[dict]:
    """Validated samples; every row that fails is counted in ``skipped`` by reason."""
    for i, (rel, caption) in enumerate(rows):
        if not caption.strip():
            skipped["missing_caption"] += 1
            continue
        path = os.path.join(folder, rel)
        if not rel or not os.path.isfile(path):
            skipped["missing_image"] += 1
            continue
        with open(path, "rb") as f:
            data = f.read()
        try:
            ext = validate_image(data, max_pixels)
        except BadSample as e:
            skipped[e.kind] += 1
            continue
        yield {"__key__": f"{i:09d}", ext: data, "txt": caption.strip()}
