"""A worker's raw samples: its shard sequence, read shard by shard and shuffled in blocks.

Where a worker is can be said in a few numbers, so a checkpoint records it and a resumed run
starts there after reading at most two blocks and one shard, however long the run has been:

- the shard sequence is a pure function of (seed, rank, worker): the ``i``-th shard is found by
  drawing, without opening anything;
- samples are shuffled in blocks of ``size``: block ``k`` is the next ``size`` raw samples, read
  from a known point of the sequence (shard ``i``, ``j`` samples into it), handed out in an order
  drawn from (seed, rank, worker, k). While block ``k`` is handed out, block ``k + 1`` is read, one
  raw sample per sample handed out, so memory holds one block and nothing stalls between blocks.

A ``Position`` is (block, the point where it began, how many of its samples were handed out,
how many samples were handed out in all, and the counts of what was skipped).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

from megaclip.data.shards import BadShard, ShardError

log = logging.getLogger("megaclip.data")

_SHARDS, _SHUFFLE = 1, 2  # stream ids mixed into seeds, so the generators never coincide
FIRST_BAD_NAMED = 5
BAD_SHARDS_IN_A_ROW = 20  # failed shards in a row with no sample between them: an error


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative ints."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def shard_sequence(num_shards: int, seed: int, rank: int, worker: int, workers: int,
                   world_size: int, resampled: bool, epochs: int = 0) -> Iterator[int]:
    """Endless shard indices for one (rank, worker). ``resampled``: each draws its own sequence
    with replacement; otherwise epochs over the list, one order per epoch shared by all and split
    by rank and worker, ``epochs`` of them (0: endless)."""
    if resampled:
        rng = random.Random(derive_seed(seed, rank, worker, _SHARDS))
        while True:
            yield rng.randrange(num_shards)
    rng = random.Random(derive_seed(seed, _SHARDS))
    gw, total = rank * workers + worker, world_size * workers
    for _ in (range(epochs) if epochs else itertools.count()):
        order = list(range(num_shards))
        rng.shuffle(order)
        yield from order[gw::total]


@dataclass
class SequencePoint:
    """A point of the shard sequence and what was read up to it."""
    shard: int = 0  # index in the worker's shard sequence
    offset: int = 0  # samples of that shard already read
    shards_read: int = 0
    shards_bad: int = 0
    first_bad: tuple = ()  # "url: reason" of the first few bad shards


@dataclass
class Position:
    """Where a worker is; see the module docstring. ``skipped`` counts bad samples by kind."""
    block: int = 0
    start: SequencePoint = field(default_factory=SequencePoint)
    emitted: int = 0
    cursor: int = 0
    skipped: dict = field(default_factory=dict)
    bad_in_a_row: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Position":
        d = dict(d)
        start = d.pop("start")
        start["first_bad"] = tuple(start.get("first_bad", ()))
        return cls(start=SequencePoint(**start), **d)


class SequenceEnd(Exception):
    """A finite shard sequence (``epochs``) has no sample left."""


class SequenceReader:
    """Raw samples along the shard sequence from ``at``. A shard that fails is logged, counted
    and left for the next one (whether there are too many is judged over all ranks, by the
    trainer); only a long run of shards that give nothing is an error here: no batch would
    ever reach the trainer to judge. At the end of a finite sequence ``next`` raises
    ``SequenceEnd``."""

    def __init__(self, urls: list[str], sequence: Iterator[int], at: SequencePoint,
                 read: Callable[..., Iterator[dict]], who: str,
                 status: Optional[Callable[[int, int], None]] = None):
        self.urls, self.read, self.who, self.status = urls, read, who, status
        self.at = dataclasses.replace(at)
        self._sequence = itertools.islice(sequence, at.shard, None)  # drawn, not opened
        self._samples: Optional[Iterator[dict]] = None
        self._url, self._got, self._empty_in_a_row, self._bad_in_a_row = "", False, 0, []

    def point(self) -> SequencePoint:
        return dataclasses.replace(self.at)

    def next(self) -> dict:
        while True:
            if self._samples is None:
                index = next(self._sequence, None)
                if index is None:
                    raise SequenceEnd()
                self._url, self._got = self.urls[index], False
                if self.at.offset == 0:
                    self.at.shards_read += 1
                self._samples = self.read(self._url, skip=self.at.offset)
                if self.status:
                    self.status(index, self.at.offset)
            try:
                sample = next(self._samples)
            except StopIteration:
                self._end_of_shard()
                continue
            except BadShard as e:
                self._bad(e)
                self._end_of_shard()
                continue
            self.at.offset += 1
            self._got, self._bad_in_a_row = True, []
            if self.status:
                self.status(-1, self.at.offset)
            return sample

    def close(self) -> None:
        if self._samples is not None:
            self._samples.close()

    def _end_of_shard(self) -> None:
        self._samples = None
        self.at.shard, self.at.offset = self.at.shard + 1, 0
        self._empty_in_a_row = 0 if self._got else self._empty_in_a_row + 1
        if self._empty_in_a_row >= max(100, len(self.urls)):
            raise ShardError(f"{self._empty_in_a_row} shards in a row gave no sample "
                             f"(last: {self._url}); the shards hold no samples")

    def _bad(self, e: BadShard) -> None:
        at = self.at
        at.shards_bad += 1
        if len(at.first_bad) < FIRST_BAD_NAMED:
            at.first_bad = at.first_bad + (f"{e.url}: {e.reason}",)
        log.warning("skipping shard %s (%s): %s [%d of %d shards read by %s were bad]",
                    e.url, self.who, e.reason, at.shards_bad, at.shards_read, self.who)
        self._bad_in_a_row.append(f"{e.url}: {e.reason}")
        if len(self._bad_in_a_row) >= BAD_SHARDS_IN_A_ROW:
            raise ShardError(f"{len(self._bad_in_a_row)} shards in a row failed for {self.who}: "
                             + "; ".join(self._bad_in_a_row[:FIRST_BAD_NAMED]) + " ...")


def _next_or_none(reader: SequenceReader) -> Optional[dict]:
    try:
        return reader.next()
    except SequenceEnd:
        return None


class BlockShuffle:
    """Raw samples of a ``SequenceReader`` in shuffled blocks of ``size``; ``position()`` is where
    the stream is after the last sample it handed out. A finite sequence leaves empty places in
    its last block (handed out as nothing, counted in ``emitted`` only, so its order and a
    resume stay the same); the iteration ends after them."""

    def __init__(self, open_reader: Callable[[SequencePoint], SequenceReader], size: int,
                 order_seed: Callable[[int], int], at: Position):
        self.open_reader, self.size, self.order_seed = open_reader, max(1, size), order_seed
        self.at = at
        self.reader: Optional[SequenceReader] = None

    def shards(self) -> SequencePoint:
        """Shards read and skipped so far, counting those of the block being read ahead."""
        return self.reader.point() if self.reader else dataclasses.replace(self.at.start)

    def position(self) -> Position:
        return dataclasses.replace(self.at, start=dataclasses.replace(self.at.start),
                                   skipped=dict(self.at.skipped))

    def _order(self, block: int) -> list[int]:
        order = list(range(self.size))
        if self.size > 1:
            random.Random(self.order_seed(block)).shuffle(order)
        return order

    def __iter__(self) -> Iterator[dict]:
        at = self.at
        reader = self.reader = self.open_reader(at.start)
        try:
            current = [_next_or_none(reader) for _ in range(self.size)]
            next_start = reader.point()
            # On resume, the samples of the next block read while the first ``emitted`` were
            # handed out are read again.
            upcoming = [_next_or_none(reader) for _ in range(at.emitted)]
            order = self._order(at.block)
            for i in order[:at.emitted]:  # handed out before the checkpoint
                current[i] = None
            while True:
                while at.emitted < self.size:
                    i = order[at.emitted]
                    sample, current[i] = current[i], None
                    upcoming.append(_next_or_none(reader))
                    at.emitted += 1
                    if sample is None:  # a place past the end of a finite sequence
                        continue
                    at.cursor += 1
                    yield sample
                if all(s is None for s in upcoming):  # only at the end of a finite sequence
                    return
                at.block, at.start, at.emitted = at.block + 1, next_start, 0
                current, upcoming, next_start = upcoming, [], reader.point()
                order = self._order(at.block)
        finally:
            reader.close()


def status_writer(array, slot: int, base: int = 0) -> Callable[[int, int], None]:
    """Records (shard index, samples read, time) of one DataLoader worker in shared memory, for
    the report of a stalled loader; a shard index of -1 keeps the current one. ``base``: where
    the source's shards start in the stream's list of every source's shards."""
    def write(shard: int, offset: int) -> None:
        if shard >= 0:
            array[3 * slot] = base + shard
        array[3 * slot + 1] = offset
        array[3 * slot + 2] = time.time()
    return write
