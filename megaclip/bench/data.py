"""Data-loader throughput: megaclip's training loader against open_clip's WebDataset pipeline
on the same shards and transform (``tools/bench_data.py``).

Each measurement runs in a fresh process (no workers or page-cache warmth shared between runs
beyond the shard files), counts only steady-state batches (the first ones, while workers
start and shuffle buffers fill, are skipped) and includes the move to the device the model
would take them on: megaclip normalises its uint8 images there (``to_device``), open_clip
hands out normalised float images.
"""
from __future__ import annotations

import importlib.machinery
import inspect
import io
import sys
import time
import types

import numpy as np

_WORDS = ("a photo of the red blue green small large old new dog cat house car tree boat "
          "street city beach mountain river man woman child at night in winter with two "
          "near under over sunny cloudy vintage modern close-up view painting drawing").split()


def bench_jpeg(rng: np.random.Generator, side: int = 256, quality: int = 95) -> bytes:
    """A JPEG that decodes like a photo of its size: smooth colour regions, edges of a few
    shapes and some sensor-like noise (pure noise would decode far slower than photos, flat
    colour far faster)."""
    from PIL import Image, ImageDraw
    grid = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3),
                        dtype=np.uint8)
    img = Image.fromarray(grid).resize((side, side), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = (int(v) for v in rng.integers(-side // 4, side, 2))
        w, h = (int(v) for v in rng.integers(side // 10, side // 2, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = (draw.ellipse, draw.rectangle)[int(rng.integers(0, 2))]
        shape((x0, y0, x0 + w, y0 + h), fill=colour)
    pixels = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (side, side, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG",
                                                                quality=quality)
    return buf.getvalue()


def bench_caption(rng: np.random.Generator) -> str:
    return " ".join(_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), int(rng.integers(5, 20))))


def write_bench_shards(out: str, shards: int, per_shard: int, side: int = 256,
                       seed: int = 0) -> str:
    """``shards`` WebDataset shards of ``per_shard`` (jpg, txt) samples; returns their pattern."""
    from megaclip.make.writer import shard_pattern, write_shards
    rng = np.random.default_rng(seed)
    samples = ({"__key__": f"s{i:08d}", "jpg": bench_jpeg(rng, side), "txt": bench_caption(rng)}
               for i in range(shards * per_shard))
    return shard_pattern(write_shards(samples, out, maxcount=per_shard))


def train_bench_tokenizer(out_prefix: str) -> str:
    from megaclip.data.tokenizer import train_sentencepiece
    rng = np.random.default_rng(1)
    return train_sentencepiece((bench_caption(rng) for _ in range(5000)), out_prefix, 64)


def _device(name: str):
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def megaclip_batches(pattern: str, tokenizer: str, workers: int, batch: int, image_size: int,
                     device: str, overrides: list):
    """Batches of megaclip's training loader (``build_train_loader``, as the trainer builds
    it), moved to ``device`` by the trainer's ``to_device``; yields the batch size of each.
    ``overrides``: ``data.key=value`` settings (``data.sources=[...]``: that mixture instead of
    ``pattern``)."""
    import dataclasses

    import torch

    from megaclip.config import load_config
    from megaclip.data.tokenizer import Tokenizer
    try:
        from megaclip.data.stream import build_train_loader
    except ImportError:  # a checkout from before the data rooms were renamed (--parent)
        from megaclip.data.webdataset import build_train_loader
    from megaclip.engine.step import to_device
    data = load_config(None, list(overrides)).data
    # A mixture given as data.sources=[...] is measured as it is; else the bench's shards.
    cfg = dataclasses.replace(data, train_shards="" if getattr(data, "sources", ()) else pattern,
                              workers=workers)
    dev = _device(device)
    kw = {"pin_memory": dev.type == "cuda"} if _accepts(build_train_loader, "pin_memory") else {}
    loader = build_train_loader(cfg, image_size, Tokenizer(tokenizer, 77), batch, 0, 1, **kw)
    norm = {"mean": cfg.mean, "std": cfg.std} if _accepts(to_device, "mean") else {}
    for b in loader:
        out = to_device(b, dev, torch.float32, **norm)
        yield out["images"].shape[0]


def open_clip_batches(pattern: str, workers: int, batch: int, image_size: int, device: str,
                      crop_scale: tuple, mean: tuple, std: tuple):
    """Batches of open_clip's own training pipeline (``open_clip_train.data.get_wds_dataset``,
    resampled shards as for a stream of pairs) with its training transform (bicubic random
    resized crop, at megaclip's crop scale) and its tokenizer."""
    import argparse

    import torch
    if "pandas" not in sys.modules:  # open_clip_train imports it for its CSV datasets only
        try:
            import pandas  # noqa: F401
        except ImportError:
            stub = types.ModuleType("pandas")
            stub.__spec__ = importlib.machinery.ModuleSpec("pandas", None)
            sys.modules["pandas"] = stub
    import functools

    import open_clip
    import open_clip_train.data as oc_data
    from webdataset.tariterators import tar_file_expander
    # webdataset 1.x marks each shard's end with an empty sample, which open_clip_train 3.3's
    # grouping (written for webdataset <= 0.2.86) cannot read: the 0.2 behaviour, no marker.
    oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    args = argparse.Namespace(train_data=pattern, dataset_resampled=True,
                              train_num_samples=10 ** 9, train_data_upsampling_factors=None,
                              seed=0, batch_size=batch, world_size=1, workers=workers)
    preprocess = open_clip.image_transform(image_size, is_train=True, mean=mean, std=std,
                                           aug_cfg={"scale": tuple(crop_scale)})
    data = oc_data.get_wds_dataset(args, preprocess, is_train=True,
                           tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    dev = _device(device)
    for images, texts in data.dataloader:
        images = images.to(dev, torch.float32, non_blocking=True)
        texts = texts.to(dev, non_blocking=True)
        yield images.shape[0]


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def measure(batches, skip: int, count: int) -> dict:
    """Samples/s over ``count`` batches after the first ``skip``."""
    it = iter(batches)
    for _ in range(skip):
        next(it)
    samples, t0 = 0, time.perf_counter()
    for _ in range(count):
        samples += next(it)
    seconds = time.perf_counter() - t0
    return {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds}


def run_one(spec: dict) -> dict:
    """One measurement in this process; ``spec`` as written by ``tools/bench_data.py``."""
    if spec["system"] == "open_clip":
        gen = open_clip_batches(spec["shards"], spec["workers"], spec["batch"],
                                spec["image_size"], spec["device"], spec["crop_scale"],
                                spec["mean"], spec["std"])
    else:
        gen = megaclip_batches(spec["shards"], spec["tokenizer"], spec["workers"], spec["batch"],
                               spec["image_size"], spec["device"], spec.get("overrides", []))
    skip = spec["skip"] if spec["skip"] >= 0 else 2 * max(1, spec["workers"]) + 2
    out = measure(gen, skip, spec["batches"])
    out["per_worker"] = out["samples_per_s"] / max(1, spec["workers"])
    return out
