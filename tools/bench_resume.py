#!/usr/bin/env python
"""How much a resumed training stream reads before its first batch, after N samples seen.

Writes small WebDataset shards (or uses --shards), brings one worker's stream to N samples seen,
saves its state as a checkpoint would, resumes from it through ``build_train_loader`` and counts
the raw samples read from shards (tar members read, over members per sample) until the first
batch. The figure should not grow with N.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaclip.errors import UserError, run_cli  # noqa: E402

EXAMPLE = """example:
  python tools/bench_resume.py --seen 1000 10000 100000
  python tools/bench_resume.py --epochs --shuffle-buffer 5000 --json resume.json
"""


def write_bench_shards(out: str, shards: int, per_shard: int) -> str:
    from PIL import Image

    from megaclip.make.writer import shard_pattern, write_shards
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 120, 30)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    samples = ({"__key__": f"s{i:08d}", "jpg": jpeg, "txt": f"a photo number {i}"}
               for i in range(shards * per_shard))
    return shard_pattern(write_shards(samples, out, maxcount=per_shard))


class MemberCount:
    """Counts tar headers read, by any reader, while active."""

    def __init__(self):
        self.members, self._next = 0, tarfile.TarFile.next

    def __enter__(self):
        count = self

        def counting_next(tar):
            info = count._next(tar)
            count.members += info is not None
            return info
        tarfile.TarFile.next = counting_next
        return self

    def __exit__(self, *exc):
        tarfile.TarFile.next = self._next


def saved_state(cfg, tokenizer, batch: int, seen: int) -> dict:
    """The stream state a checkpoint holds after ``seen`` samples (all good) of worker 0."""
    from megaclip.data import stream
    if not hasattr(stream.TrainStream, "raw_samples"):  # a stream that saves a raw-sample count
        return {"workers": 1, "world_size": 1, "cursors": {0: seen}, "bad": {},
                "batches": seen // batch}
    loader = stream.build_train_loader(cfg, 32, tokenizer, batch, 0, 1)
    dataset = loader.loader.dataset
    raw = (dataset.mixer(0, 1, 0).streams[0].raw if hasattr(dataset, "mixer")  # its one source
           else dataset.raw_samples(0, 1, 0))
    it = iter(raw)
    for _ in range(seen):  # raw samples only: what the decoded batches would have consumed
        next(it)
    loader.state.positions[0] = raw.position().to_dict()
    loader.state.batches = seen // batch
    return loader.state.state_dict()


def first_batch_cost(cfg, tokenizer, batch: int, seen: int, per_sample: int) -> dict:
    from megaclip.data.stream import build_train_loader
    state = saved_state(cfg, tokenizer, batch, seen)
    with MemberCount() as count:
        t0 = time.perf_counter()
        built = build_train_loader(cfg, 32, tokenizer, batch, 0, 1, state=state)
        loader = built[0] if isinstance(built, tuple) else built
        first = next(iter(loader))
        seconds = time.perf_counter() - t0
    assert first["images"].shape[0] == batch
    position = first["position"][1]
    cursor = position["cursor"] if isinstance(position, dict) else position
    return {"seen": seen, "samples_read": count.members // per_sample, "seconds": seconds,
            "continued": cursor == seen + batch}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seen", type=int, nargs="+", default=[1000, 10000, 100000],
                   help="samples seen by the worker before the checkpoint")
    p.add_argument("--shards", default="", help="existing shards (default: write small ones)")
    p.add_argument("--tokenizer", default="", help="SentencePiece model (default: train one)")
    p.add_argument("--shard-count", type=int, default=20)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--shuffle-buffer", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", action="store_true", help="epoch-split stream, not resampled")
    p.add_argument("--json", default="", help="also write the figures here")
    args = p.parse_args()
    if min(args.seen) < 0:
        raise UserError("--seen values must be >= 0")

    from megaclip.config import DataConfig
    from megaclip.data.tokenizer import Tokenizer, train_sentencepiece
    work = tempfile.mkdtemp(prefix="megaclip-bench-resume-")
    pattern = args.shards or write_bench_shards(os.path.join(work, "shards"), args.shard_count,
                                                args.shard_size)
    spm = args.tokenizer
    if not spm:
        train_sentencepiece((f"a photo number {i}" for i in range(2000)),
                            os.path.join(work, "spm"), 64)
        spm = os.path.join(work, "spm.model")
    tokenizer = Tokenizer(spm, 16)
    cfg = DataConfig(train_shards=pattern, resampled=not args.epochs, workers=0,
                     shuffle_buffer=args.shuffle_buffer, crop_scale=(0.5, 1.0))
    from megaclip.data.shards import expand_shards
    with tarfile.open(expand_shards(pattern)[0]) as t:
        names = [m.name for m in t.getmembers()]
    per_sample = len(names) // len({n.split(".")[0] for n in names})

    rows = []
    print(f"stream: {'epochs' if args.epochs else 'resampled'}, shuffle_buffer "
          f"{args.shuffle_buffer}, batch {args.batch}, shards of {args.shard_size} samples")
    for seen in args.seen:
        row = first_batch_cost(cfg, tokenizer, args.batch, seen, per_sample)
        rows.append(row)
        print(f"resume after {seen:>8d} samples seen: {row['samples_read']:>8d} samples read "
              f"before the first batch, {row['seconds']:.2f} s"
              + ("" if row["continued"] else " (NOT where it stopped)"), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    run_cli(main)
