"""Writing WebDataset shards (used by tools/make_shards.py and tools/make_synthetic.py)."""
from __future__ import annotations

import os
from typing import Iterable

import webdataset as wds


def write_shards(samples: Iterable[dict], out_dir: str, prefix: str = "shard",
                 maxcount: int = 1000) -> list[str]:
    """Write ``samples`` ({'__key__', 'jpg': bytes, 'txt': str, ...}) to
    ``out_dir/prefix-000000.tar``...; returns the shard paths written."""
    os.makedirs(out_dir, exist_ok=True)
    pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for s in samples:
            sink.write(s)
        count = sink.shard
    return [pattern % i for i in range(count)]


def shard_pattern(paths: list[str]) -> str:
    """A brace pattern naming ``paths`` (as written by write_shards, numbered from 0)."""
    if not paths:
        return ""
    head, _, _ = paths[0].rpartition("-")
    width = len(paths[0].rsplit("-", 1)[1].split(".")[0])
    return f"{head}-{{{0:0{width}d}..{len(paths) - 1:0{width}d}}}.tar"
