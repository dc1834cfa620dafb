"""The training stream: WebDataset shards -> block-shuffled raw samples -> decoded, tokenised batches
(docs/methods.md §5).

Every (rank, worker) pair reads its own deterministic stream (``data/shard_order.py``): its shard
sequence and block order are seeded by (seed, rank, worker), and the view of raw sample ``i`` by
(seed, rank, worker, i). Each batch carries its worker's ``Position``, so a checkpoint records
where every worker is; on resume each worker draws its way to the shard it was in without opening
the ones before, re-reads at most two blocks, and goes on exactly where it stopped.

Problems in the data never end a run silently or for a single shard: bad samples and bad shards
are skipped, counted and named; any failure on one sample skips that sample, whatever it is (the
stream replays exactly, so a sample that ended the run would end every restart too); too many of
them, or a long run of unusable samples (a wrong ``data.caption_key``), is an error that says what
the samples hold; a stalled loader is reported with the shard each worker was reading. A data
worker that dies (killed by a decoder, out of memory) has the shard it was reading recorded in
``data_worker_deaths.txt`` of the run's output folder; when the run resumes that shard is skipped
as a bad shard, and the stream is otherwise exactly the same.
"""
from __future__ import annotations

import atexit
import logging
import math
import multiprocessing as mp
import os
import time
import zlib
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megaclip.cluster import WorkerSignals
from megaclip.config import DataConfig
from megaclip.data.captions import caption_members, choose_caption
from megaclip.data.decode import BAD_KINDS, BadSampleLog, load_image, open_image
from megaclip.data.masks import Masking, batch_masks, ordinary_token_ids
from megaclip.data.mixture import (Mixer, SourcesEnded, Source, SourceStream, expand_sources, resolve_sources,
                                   sources_fingerprint)
from megaclip.data.plan import DataPlan
from megaclip.data.shard_order import (BlockShuffle, Position, SequencePoint, SequenceReader,
                                       derive_seed, shard_sequence, status_writer)
from megaclip.data.shards import BadShard, read_shard
from megaclip.data.tokenizer import Tokenizer
from megaclip.data.views import MultiCrop, TrainCrop, seeded
from megaclip.errors import FatalError, UserError

log = logging.getLogger("megaclip.data")
_SHUFFLE, _MASKS, _CAPTION = 2, 3, 6  # stream ids mixed into seeds: the generators never coincide
STATE_FORMAT = 2
SKIP_KINDS = BAD_KINDS + ("shards",)  # what the logs count as skipped_<kind>, summed over ranks


class TrainStream(IterableDataset):
    """Endless batches ``{images, tokens, eot, position: (worker, Position dict), skipped:
    {kind: n, "shards": n}}``, plus the masks ``masking`` asks for (``image_mask``,
    ``mlm_tokens``/``mlm_target``/``mlm_embed``), drawn per sample from the same seed as its
    view. ``images`` (B, 3, S, S) are uint8, normalised on the device (``to_device``). With
    ``multicrop`` (SILC), ``images`` is each sample's first global crop, ``views``
    (B, G-1, 3, S, S) its other global crops and ``local_views`` (B, L, 3, s, s) its local
    crops, all drawn from the sample's seed. With ``data.sources``, ``sources`` holds each
    source's counters (``Mixer.counters``) and ``ended`` the note of a source whose running out
    ends the run. With ``plan`` (a staged objective, ``data/plan.py``) each micro-batch gets
    the masks and views of its step's stage instead. A problem that ends the run arrives as a
    batch ``{"error": message}``."""

    def __init__(self, cfg: DataConfig, image_size: int, tokenizer: Tokenizer, batch_size: int,
                 rank: int, world_size: int, start: Optional[dict[int, dict]] = None,
                 stream_seed: int = 0, rotate: int = 0, masking: Optional[Masking] = None,
                 urls: Optional[list[str]] = None, status=None,
                 multicrop: Optional[MultiCrop] = None, refused: Optional[dict] = None,
                 plan: Optional[DataPlan] = None):
        self.cfg, self.tokenizer, self.batch_size = cfg, tokenizer, batch_size
        self.refused = dict(refused or {})  # shard -> why it is skipped unread
        self.multicrop = multicrop
        self.masking = masking
        self.plan = plan
        masks_text = (plan.masks_text() if plan is not None
                      else masking is not None and masking.text is not None)
        self.ordinary_ids = ordinary_token_ids(tokenizer) if masks_text else None
        self.rank, self.world_size = rank, world_size
        self.sources = resolve_sources(cfg, urls)
        self.mixed = bool(cfg.sources)
        self.urls = [u for source in self.sources for u in source.urls]  # every source's
        workers = max(1, cfg.workers)
        for source in self.sources:
            if not source.resampled and len(source.urls) < world_size * workers:
                raise UserError(
                    f"{len(source.urls)} shards"
                    + (f" of source '{source.name}'" if source.name else "")
                    + f" cannot be split over {world_size} ranks x {workers} workers; set "
                    f"data.resampled=true or use more shards")
        self.start = dict(start or {})
        # The DataLoader always asks its worker 0 first; after a resume the next batch is due
        # from logical stream ``rotate``, so loader worker i plays logical stream i + rotate.
        self.rotate = rotate
        self.seed = derive_seed(cfg.seed, stream_seed)
        self.crop = TrainCrop(image_size, cfg.crop_scale, cfg.crop_ratio)
        self.status = status  # shared (shard, offset, time) per loader worker, or None

    def mixer(self, wid: int, nw: int, slot: int) -> Mixer:
        """Worker ``wid``'s usable samples, from its saved position (or the beginning)."""
        saved, mixed = self.start.get(wid), self.mixed
        if mixed:
            saved = saved or {"draws": 0, "ended": [], "sources": {}}
        streams = []
        for source in self.sources:
            at = (saved["sources"].get(source.name) if mixed else saved) if saved else None
            at = Position.from_dict(at) if at else Position()
            streams.append(SourceStream(
                source, self.raw_samples(wid, nw, slot, source, at),
                BadSampleLog(self.cfg.log_bad_samples, self.cfg.max_bad_samples_in_a_row,
                             at.skipped, at.bad_in_a_row, source.name)))
        return Mixer(streams, self.seed, self.rank, wid, self.cfg.on_source_exhausted, mixed,
                     saved["draws"] if mixed else 0, tuple(saved["ended"]) if mixed else ())

    def raw_samples(self, wid: int, nw: int, slot: int, source: Source,
                    at: Position) -> BlockShuffle:
        """Worker ``wid``'s raw samples of ``source`` from ``at``."""
        cfg, who = self.cfg, f"rank {self.rank} worker {wid}"
        if source.name:
            who += f" source '{source.name}'"
        seed = source.seed(self.seed, self.mixed)
        needed = frozenset(cfg.image_keys) | caption_members(source.captions)

        def read(url: str, skip: int) -> Iterator[dict]:
            if url in self.refused:
                return _refused(url, self.refused[url])
            return read_shard(url, cfg.max_member_bytes, skip, needed, cfg.max_sample_bytes,
                              cfg.shard_stall_timeout_s)

        def open_reader(point: SequencePoint) -> SequenceReader:
            seq = shard_sequence(len(source.urls), seed, self.rank, wid, nw, self.world_size,
                                 source.resampled, source.epochs)
            return SequenceReader(
                list(source.urls), seq, point, read, who,
                status_writer(self.status, slot, source.base) if self.status is not None
                else None)
        return BlockShuffle(open_reader, cfg.shuffle_buffer,
                            lambda block: derive_seed(seed, self.rank, wid, _SHUFFLE, block), at)

    def _stage(self, produced: int, nw: int, slot: int) -> tuple:
        """(masking, multicrop) of this worker's next micro-batch: it has handed out
        ``produced`` of them, and loader worker ``slot`` of ``nw`` hands out micro-batches
        slot, slot + nw, ... of the loader (the DataLoader asks its workers in turn)."""
        if self.plan is None:
            return self.masking, self.multicrop
        stage = self.plan.stage_of(produced * nw + slot)
        return stage.masking, (self.multicrop if stage.multicrop else None)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        nw = info.num_workers if info else 1
        slot = info.id if info else 0
        wid = (slot + self.rotate) % nw
        try:
            yield from self._batches(wid, nw, slot)
        except UserError as e:  # ends the run: told to the main process, which raises it
            yield {"error": str(e)}

    def _batches(self, wid: int, nw: int, slot: int) -> Iterator[dict]:
        cfg = self.cfg
        mix = self.mixer(wid, nw, slot)
        image_keys, image_formats = tuple(cfg.image_keys), tuple(cfg.image_formats)
        source_seeds = {s.name: s.seed(self.seed, self.mixed) for s in self.sources}

        def decode(sample: dict, stream: SourceStream, index: int) -> tuple:
            seed = derive_seed(source_seeds[stream.source.name], self.rank, wid, index)
            captions = stream.source.captions
            caption = choose_caption(sample, captions, derive_seed(seed, _CAPTION) / 2.0 ** 63
                                     if len(captions) > 1 else 0.0, cfg.max_caption_bytes)
            image = open_image(sample, image_keys, cfg.max_image_pixels, image_formats)
            if multicrop is None:  # the box first: it decides the JPEG draft size (the
                size = image.size  # stage's multicrop: set below, before each micro-batch)
                box = self.crop.box(*size, seed)
                image = load_image(image, self.crop.draft_size(*size, box)
                                   if cfg.jpeg_draft else None)
                return caption, seed, self.crop(image, box, size)
            return caption, seed, seeded(multicrop, load_image(image), seed)

        images, captions, seeds, views, local_views = [], [], [], [], []
        produced, last, ending = 0, None, False
        masking, multicrop = self._stage(produced, nw, slot)
        while True:
            try:
                _, (caption, seed, view) = mix.next(decode)
            except SourcesEnded as end:
                # Every source ran out (data.on_source_exhausted=stop): this micro-batch is
                # filled with its own samples (or the previous one's) and handed out for as long
                # as the loader asks; the trainer stops at the end of its step.
                filler = ((images, captions, seeds, views, local_views) if images
                          else last if last is not None and last[5] == (masking, multicrop)
                          else None)  # the previous micro-batch, if it has this one's stage
                if filler is None:
                    raise UserError(str(end)) from None
                n = len(filler[0])
                images, captions, seeds, views, local_views = (
                    [lst[i % n] for i in range(self.batch_size)] if lst else []
                    for lst in filler[:5])
                ending = True
            else:
                if multicrop is not None:
                    globals_, locals_ = view
                    images.append(globals_[0])
                    views.append(globals_[1:])
                    local_views.append(locals_)
                else:
                    images.append(view)
                captions.append(caption)
                if masking is not None:
                    seeds.append(derive_seed(seed, _MASKS))
            if len(images) == self.batch_size:
                tokens, eot = self.tokenizer.encode(captions)
                batch = {"images": torch.stack(images), "tokens": tokens, "eot": eot,
                         "position": (wid, mix.position()), "skipped": mix.skipped(),
                         "shards_read": mix.shards_read(), "first_bad": mix.first_bad()}
                if mix.mixed:
                    batch["sources"] = mix.counters()
                    note = mix.take_note()
                    if note:
                        batch["ended"] = note
                if multicrop is not None:
                    batch["views"], batch["local_views"] = (torch.stack(views),
                                                            torch.stack(local_views))
                if masking is not None:
                    batch.update(batch_masks(masking, seeds, tokens, eot, self.ordinary_ids))
                yield batch
                if ending:
                    repeat = {k: v for k, v in batch.items() if k != "ended"}
                    while True:
                        yield repeat
                last = (images, captions, seeds, views, local_views, (masking, multicrop))
                images, captions, seeds, views, local_views = [], [], [], [], []
                produced += 1
                masking, multicrop = self._stage(produced, nw, slot)


def _refused(url: str, why: str) -> Iterator[dict]:
    raise BadShard(url, why)
    yield  # a generator: the error comes when the shard is read, like any other


def bad_shards_over_limit(bad: int, read: int, fraction: float) -> bool:
    """Whether ``bad`` of ``read`` shards is clearly more than ``fraction``: more than
    fraction x read plus three standard deviations of a binomial count, plus 2, so a dataset
    at the limit does not trip it by chance. A fraction of 0 tolerates none, 1 any number."""
    if fraction <= 0:
        return bad > 0
    if fraction >= 1:
        return False
    mean = fraction * read
    return bad > mean + 3 * math.sqrt(mean * (1 - fraction)) + 2


class StreamState:
    """What the trainer remembers of the stream: each worker's position and skip counts."""

    def __init__(self, workers: int, world_size: int, positions: Optional[dict] = None,
                 skipped: Optional[dict] = None, batches: int = 0,
                 fingerprint: Optional[list] = None, sources: Optional[dict] = None,
                 resumed: bool = False):
        self.workers, self.world_size = workers, world_size
        self.positions: dict[int, dict] = {int(k): v for k, v in (positions or {}).items()}
        self.skipped: dict[int, dict] = {int(k): dict(v) for k, v in (skipped or {}).items()}
        self.batches = batches
        self.fingerprint = fingerprint
        self.shards_read: dict[int, int] = {}
        self.first_bad: dict[int, tuple] = {}
        # data.sources: per worker, per source [samples, skipped samples, skipped shards]
        self.sources: dict[int, dict] = {int(k): dict(v) for k, v in (sources or {}).items()}
        self.resumed = resumed  # the saved position was taken up (not a fresh or restarted one)
        self.ended: list[str] = []  # notes of sources whose running out ends the run

    def update(self, batch: dict) -> None:
        self.batches += 1
        wid = int(batch["position"][0])
        self.positions[wid] = batch["position"][1]
        self.skipped[wid] = batch["skipped"]
        self.shards_read[wid] = batch["shards_read"]
        self.first_bad[wid] = tuple(batch["first_bad"])
        if "sources" in batch:
            self.sources[wid] = batch["sources"]
        if "ended" in batch:
            self.ended.append(batch["ended"])

    def source_totals(self) -> dict[str, list[int]]:
        """Per source, over this rank's workers: [samples used, samples skipped, shards
        skipped] (``mixture.COUNTERS``; empty without data.sources)."""
        out: dict[str, list[int]] = {}
        for counters in self.sources.values():
            for name, values in counters.items():
                out[name] = [a + int(b) for a, b in zip(out.get(name, [0] * len(values)),
                                                        values)]
        return out

    def first_bad_shards(self) -> list[str]:
        return [name for names in self.first_bad.values() for name in names]

    def skipped_total(self) -> dict[str, int]:
        """Skipped samples by kind and skipped shards (``"shards"``), over this rank's workers."""
        out: dict[str, int] = {}
        for counts in self.skipped.values():
            for k, v in counts.items():
                out[k] = out.get(k, 0) + int(v)
        return out

    def state_dict(self) -> dict:
        out = {"format": STATE_FORMAT, "workers": self.workers, "world_size": self.world_size,
               "positions": dict(self.positions), "skipped": dict(self.skipped),
               "batches": self.batches, "fingerprint": self.fingerprint}
        if self.sources:
            out["sources"] = dict(self.sources)
        return out


class TrainLoader:
    """Iterates the DataLoader's batches, keeping ``state`` up to date; an error a worker
    reports is raised here, and a loader that delivers nothing for ``data.loader_timeout_s`` is
    reported with the shard each worker was reading."""

    def __init__(self, loader: DataLoader, state: StreamState, urls: list[str], status,
                 closing=None, deaths_file: Optional[str] = None):
        self.loader, self.state, self.urls, self.status = loader, state, urls, status
        self.deaths_file = deaths_file
        self.closing = closing  # set: the workers may leave on a stop signal (WorkerSignals)
        if closing is not None:  # runs before multiprocessing's own exit handler terminates them
            atexit.register(_set_flag, closing)

    def close(self) -> None:
        """Shut the workers down now (they ignore the stop signals until this is called)."""
        if self.closing is not None:
            self.closing.value = 1
        it = getattr(self.loader, "_iterator", None)  # the persistent workers' iterator
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __iter__(self) -> Iterator[dict]:
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except RuntimeError as e:
                if "timed out" in str(e) and self.status is not None:
                    raise FatalError(self.stall_report(self.loader.timeout)) from None
                self.raise_if_a_worker_died(e)
                raise
            if "error" in batch:
                raise UserError(batch["error"])
            self.state.update(batch)
            yield batch

    def raise_if_a_worker_died(self, error: BaseException) -> None:
        """When a data worker has died (torch reports it as a ``RuntimeError``, from wherever
        the main process was), record the shard it was reading in ``deaths_file`` and raise a
        ``FatalError`` that says so: a resumed run skips that shard instead of dying on it
        again. Nothing happens when every worker is alive."""
        workers = getattr(getattr(self.loader, "_iterator", None), "_workers", None) or []
        dead = [(slot, w.exitcode) for slot, w in enumerate(workers)
                if not w.is_alive() and w.exitcode not in (0, None)]
        if not dead or self.status is None:
            return
        lines = []
        for slot, code in dead:
            shard, _, when = self.status[3 * slot: 3 * slot + 3]
            url = self.urls[int(shard)] if when else None
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            if url is not None and self.deaths_file:
                with open(self.deaths_file, "a") as f:
                    f.write(url + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            lines.append(f"data worker {slot} died ({how}) while reading "
                         + (f"{url}; it is recorded in {self.deaths_file} and skipped when the "
                            f"run resumes" if url and self.deaths_file else (url or "no shard")))
        raise FatalError("; ".join(lines) + f" ({error})") from None

    def stall_report(self, waited: float) -> str:
        now, lines = time.time(), []
        for slot in range(len(self.status) // 3):
            shard, offset, when = self.status[3 * slot: 3 * slot + 3]
            where = (f"reading {self.urls[int(shard)]} (sample {int(offset)})" if when
                     else "not started")
            since = f", no progress for {now - when:.0f} s" if when else ""
            lines.append(f"DataLoader worker {slot}: {where}{since}")
        return (f"the data loader delivered no batch for {waited:g} s (data.loader_timeout_s); "
                + "; ".join(lines))


def _set_flag(flag) -> None:
    flag.value = 1


def build_train_loader(cfg: DataConfig, image_size: int, tokenizer: Tokenizer, batch_size: int,
                       rank: int, world_size: int, state: Optional[dict] = None,
                       restart_seed: int = 0, masking: Optional[Masking] = None,
                       urls=None,
                       stop_signals: tuple = (),
                       multicrop: Optional[MultiCrop] = None,
                       pin_memory: bool = False,
                       deaths_file: Optional[str] = None,
                       plan: Optional[DataPlan] = None) -> TrainLoader:
    """The loader over this rank's stream. ``state`` is a saved ``StreamState.state_dict()``;
    when the topology, shard list or stream settings it was saved under differ, the stream
    restarts with fresh seeds (``restart_seed``) instead of replaying samples. ``urls``: the
    shard lists, if already expanded (``expand_sources``: a list, or with data.sources each
    source's by name). ``stop_signals``: the signals the main
    process handles; the workers do not die of them (``WorkerSignals``). ``multicrop``: SILC's
    views instead of one crop per sample. ``pin_memory``: batches in page-locked memory, for
    non-blocking copies to a GPU. ``deaths_file``: where a dead worker's shard is recorded;
    the shards it lists are skipped unread (as bad shards). ``plan``: what each micro-batch
    draws, by its step, for an objective whose terms start late (``data/plan.py``)."""
    workers = cfg.workers
    urls = urls if urls is not None else expand_sources(cfg)
    sources = resolve_sources(cfg, urls)
    flat = [u for source in sources for u in source.urls]
    # What a saved position means depends on all of these; if one changed, replaying would
    # silently read other samples, so the stream restarts with fresh seeds instead.
    fingerprint = [world_size, max(1, workers), len(flat),
                   zlib.crc32("\n".join(flat).encode()), max(1, cfg.shuffle_buffer),
                   cfg.resampled, cfg.seed]
    if cfg.sources:  # train_shards alone: the fingerprint it always had
        fingerprint.append(sources_fingerprint(sources))
    start, stream_seed = None, 0
    kept = StreamState(max(1, workers), world_size, fingerprint=fingerprint)
    if state:
        if state.get("format") == STATE_FORMAT and state.get("fingerprint") == fingerprint:
            kept = StreamState(state["workers"], world_size, state["positions"],
                               state["skipped"], state["batches"], fingerprint,
                               state.get("sources"), resumed=True)
            start = kept.positions
        else:
            stream_seed = restart_seed
            log.warning("the data stream was saved by %s rank(s) x %s worker(s) over other "
                        "shards or stream settings (format %s); it restarts with fresh seeds "
                        "instead of replaying", state.get("world_size"), state.get("workers"),
                        state.get("format", 1))
    status = mp.Array("d", 3 * workers, lock=False) if workers > 0 else None
    refused = {}
    if deaths_file and os.path.isfile(deaths_file):
        with open(deaths_file) as f:
            refused = {line.strip(): f"a data worker died reading it before (listed in "
                                     f"{deaths_file})" for line in f if line.strip()}
    ds = TrainStream(cfg, image_size, tokenizer, batch_size, rank, world_size, start, stream_seed,
                     rotate=kept.batches % kept.workers, masking=masking, urls=urls,
                     status=status, multicrop=multicrop, refused=refused, plan=plan)
    closing = mp.Value("b", 0, lock=False) if workers > 0 else None
    on_start = WorkerSignals(stop_signals, closing) if workers > 0 else None
    loader = DataLoader(ds, batch_size=None, num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
                        pin_memory=pin_memory,
                        timeout=cfg.loader_timeout_s if workers > 0 else 0,
                        worker_init_fn=on_start)
    return TrainLoader(loader, kept, flat, status, closing, deaths_file)
