"""A weighted mixture of sources in one worker's stream (``data.sources``).

Each source is a stream of its own, as ``data.train_shards`` is (its shard sequence, block
shuffle and per-sample seeds, all seeded by the source's name as well), read by every (rank,
worker). The ``n``-th sample a worker hands out comes from the source drawn with a uniform
number seeded by (seed, rank, worker, n), by weight among the sources that have samples left;
that source is read until it gives a usable sample, so the weights hold for the samples that
reach the batches, whatever share of a source is bad. A worker's position is the number of
draws, each source's ``Position`` and the sources that ran out: a resumed worker draws the same
sources and reads the same samples.

A source that runs out (``epochs`` passes without resampling) is dropped from the draws, with a
log line; with ``data.on_source_exhausted=stop`` the batch it ran out in also carries a note
that ends the run after its step. ``data.train_shards`` is the one-source case: no draws, and
the position is that source's ``Position`` alone, as it always was.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

from megaclip.config import DataConfig
from megaclip.data.decode import BadSample, BadSampleLog
from megaclip.data.shard_order import BlockShuffle, derive_seed
from megaclip.data.shards import shard_list
from megaclip.errors import UserError

log = logging.getLogger("megaclip.data")
_SOURCE, _MIX = 4, 5  # stream ids mixed into seeds, so the generators never coincide
COUNTERS = ("samples", "bad_samples", "bad_shards")  # logged per source: data/<name>/<counter>


@dataclass(frozen=True)
class Source:
    """One source, resolved: its shard list, where it starts in the stream's flat list of every
    source's shards (``base``), and the data section's values where it set none."""
    name: str
    urls: tuple
    base: int
    weight: float
    captions: tuple  # (key, probability) pairs
    resampled: bool
    epochs: int

    def seed(self, stream_seed: int, mixed: bool) -> int:
        """The seed of its shard sequence, block order and samples: the stream's own for the
        one source of train_shards (the stream as it always was), else one by its name."""
        return (derive_seed(stream_seed, _SOURCE, zlib.crc32(self.name.encode())) if mixed
                else stream_seed)


def global_captions(cfg: DataConfig) -> tuple:
    """The caption keys of a source that names none: data.caption_keys, else data.caption_key."""
    return cfg.caption_keys or ((cfg.caption_key, 1.0),)


def expand_sources(cfg: DataConfig) -> Union[list, dict]:
    """The shard lists (rank 0 expands them, ``shard_list``): train_shards' list, or each
    source's by name."""
    if not cfg.sources:
        return shard_list(cfg.train_shards)
    return {s.name: shard_list(s.shards) for s in cfg.sources}


def resolve_sources(cfg: DataConfig, urls: Union[list, dict, None] = None) -> list[Source]:
    """The stream's sources, from ``expand_sources``'s lists (expanded here when None)."""
    urls = expand_sources(cfg) if urls is None else urls
    if not cfg.sources:
        return [Source("", tuple(urls), 0, 1.0, global_captions(cfg), cfg.resampled, 0)]
    out, base = [], 0
    for s in cfg.sources:
        mine = tuple(urls[s.name])
        out.append(Source(s.name, mine, base, s.weight, s.caption_keys or global_captions(cfg),
                          cfg.resampled if s.resampled is None else s.resampled, s.epochs))
        base += len(mine)
    return out


def sources_fingerprint(sources: list[Source]) -> list:
    """What a saved mixture position depends on besides the topology (the stream's own
    fingerprint): each source's name, shard list and settings, the weights and their order."""
    return [[s.name, len(s.urls), zlib.crc32("\n".join(s.urls).encode()), s.weight,
             s.resampled, s.epochs] for s in sources]


def draw_source(seed: int, rank: int, worker: int, n: int, weights: list[float]) -> int:
    """The source of a worker's ``n``-th sample: index drawn by ``weights`` (0: has none left)
    with a uniform number of (seed, rank, worker, n), so any draw is found without the ones
    before it. Raises ``LookupError`` when every weight is 0."""
    total = sum(weights)
    if total <= 0:
        raise LookupError("no source has samples left")
    live = [i for i, w in enumerate(weights) if w > 0]
    if len(live) == 1:
        return live[0]
    target, acc = derive_seed(seed, rank, worker, _MIX, n) / 2.0 ** 63 * total, 0.0
    for i in live:
        acc += weights[i]
        if target < acc:
            return i
    return live[-1]  # the product rounded up to the total


class SourcesEnded(Exception):
    """Every source of a worker ran out with ``data.on_source_exhausted=stop``: the stream
    hands out its last micro-batch, filled, and the run stops at the end of that step."""


@dataclass
class SourceStream:
    """One source's raw samples in a worker (its ``BlockShuffle`` and bad-sample counts)."""
    source: Source
    raw: BlockShuffle
    bad: BadSampleLog
    it: Optional[Iterator[dict]] = None

    def counters(self) -> list[int]:
        """[samples used, samples skipped, shards skipped] so far (``COUNTERS``)."""
        bad = sum(self.bad.counts.values())
        return [self.raw.at.cursor - bad, bad, self.raw.shards().shards_bad]


class Mixer:
    """A worker's usable samples, drawn from its ``streams`` by weight (see the module
    docstring). ``draws`` and ``ended``: where a saved position left off; ``mixed``: the
    sources of data.sources (else the one source of train_shards)."""

    def __init__(self, streams: list[SourceStream], seed: int, rank: int, worker: int,
                 on_exhausted: str, mixed: bool, draws: int = 0, ended: tuple = ()):
        self.streams, self.seed, self.rank, self.worker = streams, seed, rank, worker
        self.mixed = mixed  # data.sources (even of one source), not train_shards
        self.on_exhausted, self.draws = on_exhausted, draws
        self.ended = [s.source.name for s in streams if s.source.name in ended]
        self.note: Optional[str] = None  # a run-ending exhaustion, for the next batch

    def next(self, decode: Callable[[dict, SourceStream, int], object]
             ) -> tuple[SourceStream, object]:
        """The next usable sample: (its source, ``decode(sample, source, index)``), where
        ``index`` is the sample's place in its source's stream (its seed). A ``BadSample``
        (or any other error) from ``decode`` skips the sample, counted for its source."""
        while True:
            weights = [0.0 if s.source.name in self.ended else s.source.weight
                       for s in self.streams]
            try:
                chosen = self.streams[draw_source(self.seed, self.rank, self.worker, self.draws,
                                                  weights)]
            except LookupError:
                if self.on_exhausted == "stop":  # the run stops at this step's end
                    raise SourcesEnded(self._all_ran_out()) from None
                raise UserError(self._all_ran_out()) from None
            if chosen.it is None:
                chosen.it = iter(chosen.raw)
            while True:  # this source until it gives a usable sample or runs out
                try:
                    sample = next(chosen.it)
                except StopIteration:
                    self._ran_out(chosen)
                    break
                index = chosen.raw.at.cursor - 1
                try:
                    out = decode(sample, chosen, index)
                except BadSample as err:
                    chosen.bad.add(err, sample)
                    continue
                except Exception as e:  # noqa: BLE001 - whatever one sample does, it is skipped
                    chosen.bad.add(BadSample("sample_error", f"{type(e).__name__}: {e}"), sample)
                    continue
                chosen.bad.good()
                self.draws += 1
                return chosen, out

    def _ran_out(self, stream: SourceStream) -> None:
        # The saved position keeps the shards it read to the end: a resumed run never reads an
        # ended source again, so its counters come from here, equal to an uninterrupted run's.
        stream.raw.at.start = stream.raw.shards()
        self.ended.append(stream.source.name)
        used = stream.counters()[0]
        what = (f"source '{stream.source.name}' ran out for rank {self.rank} worker "
                f"{self.worker} after {used} samples ({stream.source.epochs} epoch(s))")
        if self.on_exhausted == "stop":
            self.note = what
            log.warning("%s; the run stops after this step (data.on_source_exhausted=stop)",
                        what)
        else:
            log.warning("%s; dropped, the other sources go on by their weights", what)

    def _all_ran_out(self) -> str:
        return (f"every source ran out for rank {self.rank} worker {self.worker} "
                f"({', '.join(self.ended)}); nothing is left to train on. With "
                f"data.on_source_exhausted=stop the run ends with a checkpoint instead")

    def take_note(self) -> Optional[str]:
        note, self.note = self.note, None
        return note

    def position(self) -> dict:
        """The worker's position: its one source's ``Position``, or for a mixture the draws,
        each source's ``Position`` and the sources that ran out."""
        for s in self.streams:
            s.raw.at.skipped, s.raw.at.bad_in_a_row = dict(s.bad.counts), s.bad.in_a_row
        if not self.mixed:
            return self.streams[0].raw.position().to_dict()
        return {"draws": self.draws, "ended": list(self.ended),
                "sources": {s.source.name: s.raw.position().to_dict() for s in self.streams}}

    def skipped(self) -> dict:
        """Skipped samples by kind over the sources, and skipped shards (``"shards"``)."""
        out: dict = {}
        for s in self.streams:
            for k, v in s.bad.counts.items():
                out[k] = out.get(k, 0) + v
        out["shards"] = sum(s.raw.shards().shards_bad for s in self.streams)
        return out

    def shards_read(self) -> int:
        return sum(s.raw.shards().shards_read for s in self.streams)

    def first_bad(self) -> tuple:
        return tuple(name for s in self.streams for name in s.raw.shards().first_bad)

    def counters(self) -> dict[str, list[int]]:
        """Per source: [samples used, samples skipped, shards skipped]."""
        return {s.source.name: s.counters() for s in self.streams}
