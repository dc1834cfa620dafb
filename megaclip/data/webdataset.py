"""The training stream: WebDataset shards -> shuffled raw samples -> decoded, tokenised batches.

Every (rank, worker) pair reads its own deterministic stream: its shard sequence and shuffle
buffer are seeded by (seed, rank, worker), and the view of raw sample ``i`` is seeded by
(seed, rank, worker, i). Each batch carries its worker's raw-sample cursor, so a checkpoint can
record how far every worker got; on resume each worker skips that many raw samples without
decoding them and the stream goes on exactly where it stopped.
"""
from __future__ import annotations

import itertools
import random
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megaclip.config import DataConfig
from megaclip.data.decode import BadSample, BadSampleLog, decode_caption, decode_image
from megaclip.data.masks import Masking, batch_masks, ordinary_token_ids
from megaclip.data.shards import ShardError, expand_shards, iter_shard
from megaclip.data.tokenizer import Tokenizer
from megaclip.data.views import seeded, train_transform
from megaclip.errors import UserError

_SHARDS, _SHUFFLE, _MASKS = 1, 2, 3  # stream ids mixed into seeds, so the generators never coincide


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative ints."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def shuffle_buffer(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir shuffle: fill ``size`` samples, then emit a random one for each new arrival."""
    if size <= 1:
        yield from samples
        return
    buf: list[dict] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = rng.randrange(size)
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


class TrainStream(IterableDataset):
    """Endless batches ``{images, tokens, eot, position: (worker, cursor), bad: {kind: n}}``,
    plus the masks ``masking`` asks for (``image_mask``, ``mlm_tokens``/``mlm_target``/
    ``mlm_embed``), drawn per sample from the same seed as its view."""

    def __init__(self, cfg: DataConfig, image_size: int, tokenizer: Tokenizer, batch_size: int,
                 rank: int, world_size: int, start: Optional[dict[int, int]] = None,
                 stream_seed: int = 0, rotate: int = 0, masking: Optional[Masking] = None):
        self.cfg, self.tokenizer, self.batch_size = cfg, tokenizer, batch_size
        self.masking = masking
        self.ordinary_ids = (ordinary_token_ids(tokenizer)
                             if masking is not None and masking.text is not None else None)
        self.rank, self.world_size = rank, world_size
        self.urls = expand_shards(cfg.train_shards)
        workers = max(1, cfg.workers)
        if not cfg.resampled and len(self.urls) < world_size * workers:
            raise UserError(f"{len(self.urls)} shards cannot be split over {world_size} ranks x "
                            f"{workers} workers; set data.resampled=true or use more shards")
        self.start = dict(start or {})
        # The DataLoader always asks its worker 0 first; after a resume the next batch is due
        # from logical stream ``rotate``, so loader worker i plays logical stream i + rotate.
        self.rotate = rotate
        self.seed = derive_seed(cfg.seed, stream_seed)
        self.transform = train_transform(image_size, cfg.crop_scale, cfg.mean, cfg.std)

    # -- raw samples ---------------------------------------------------------------------
    def _shard_sequence(self, wid: int, nw: int) -> Iterator[str]:
        if self.cfg.resampled:  # each (rank, worker) draws its own endless sequence
            rng = random.Random(derive_seed(self.seed, self.rank, wid, _SHARDS))
            while True:
                yield rng.choice(self.urls)
        # Epochs over the shard list: one order per epoch, shared by all, split by node and worker.
        rng = random.Random(derive_seed(self.seed, _SHARDS))
        gw, total = self.rank * nw + wid, self.world_size * nw
        while True:
            order = list(self.urls)
            rng.shuffle(order)
            yield from order[gw::total]

    def _raw_samples(self, wid: int, nw: int) -> Iterator[dict]:
        empty_in_a_row = 0
        for url in self._shard_sequence(wid, nw):
            n = 0
            for sample in iter_shard(url):
                n += 1
                yield sample
            empty_in_a_row = 0 if n else empty_in_a_row + 1
            if empty_in_a_row >= max(100, len(self.urls)):
                raise ShardError(f"shards of '{self.cfg.train_shards}' hold no samples")

    # -- decoded batches -----------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        nw = info.num_workers if info else 1
        wid = ((info.id if info else 0) + self.rotate) % nw
        raw = shuffle_buffer(self._raw_samples(wid, nw), self.cfg.shuffle_buffer,
                             random.Random(derive_seed(self.seed, self.rank, wid, _SHUFFLE)))
        cursor = self.start.get(wid, 0)
        for _ in itertools.islice(raw, cursor):  # consumed before the checkpoint: not decoded
            pass
        bad = BadSampleLog(self.cfg.log_bad_samples)
        images, captions, seeds = [], [], []
        for sample in raw:
            index, cursor = cursor, cursor + 1
            try:
                caption = decode_caption(sample, self.cfg.caption_key)
                image = decode_image(sample, tuple(self.cfg.image_keys), self.cfg.max_image_pixels)
            except BadSample as err:
                bad.add(err, sample)
                continue
            seed = derive_seed(self.seed, self.rank, wid, index)
            images.append(seeded(self.transform, image, seed))
            captions.append(caption)
            if self.masking is not None:
                seeds.append(derive_seed(seed, _MASKS))
            if len(images) == self.batch_size:
                tokens, eot = self.tokenizer.encode(captions)
                batch = {"images": torch.stack(images), "tokens": tokens, "eot": eot,
                         "position": (wid, cursor), "bad": dict(bad.counts)}
                if self.masking is not None:
                    batch.update(batch_masks(self.masking, seeds, tokens, eot, self.ordinary_ids))
                yield batch
                images, captions, seeds = [], [], []


class StreamState:
    """What the trainer remembers of the stream: each worker's cursor and bad-sample counts."""

    def __init__(self, workers: int, world_size: int, cursors: Optional[dict] = None,
                 bad: Optional[dict] = None, batches: int = 0):
        self.workers, self.world_size = workers, world_size
        self.cursors: dict[int, int] = {int(k): int(v) for k, v in (cursors or {}).items()}
        self.bad: dict[int, dict] = {int(k): dict(v) for k, v in (bad or {}).items()}
        self.batches = batches

    def update(self, batch: dict) -> None:
        self.batches += 1
        wid, cursor = batch["position"]
        self.cursors[int(wid)] = int(cursor)
        self.bad[int(wid)] = batch["bad"]

    def bad_total(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for counts in self.bad.values():
            for k, v in counts.items():
                out[k] = out.get(k, 0) + int(v)
        return out

    def state_dict(self) -> dict:
        return {"workers": self.workers, "world_size": self.world_size,
                "cursors": self.cursors, "bad": self.bad, "batches": self.batches}


def build_train_loader(cfg: DataConfig, image_size: int, tokenizer: Tokenizer, batch_size: int,
                       rank: int, world_size: int, state: Optional[dict] = None,
                       restart_seed: int = 0, masking: Optional[Masking] = None
                       ) -> tuple[DataLoader, StreamState]:
    """The DataLoader and the state object that follows it. ``state`` is a saved
    ``StreamState.state_dict()``; when the topology it was saved under differs, the stream
    restarts with fresh seeds (``restart_seed``) instead of replaying samples."""
    workers = cfg.workers
    start, stream_seed, kept = None, 0, StreamState(max(1, workers), world_size)
    if state:
        if state["workers"] == max(1, workers) and state["world_size"] == world_size:
            kept = StreamState(state["workers"], world_size, state["cursors"], state["bad"],
                               state["batches"])
            start = kept.cursors
        else:
            stream_seed = restart_seed
    ds = TrainStream(cfg, image_size, tokenizer, batch_size, rank, world_size, start, stream_seed,
                     rotate=kept.batches % kept.workers, masking=masking)
    loader = DataLoader(ds, batch_size=None, num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None)
    return loader, kept
