"""Shard lists: brace patterns, existence checks, and reading a shard into raw samples."""
from __future__ import annotations

import os
from typing import Iterator

import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from megaclip.errors import UserError


class ShardError(UserError):
    """A shard that cannot be opened or read; the message names it."""


def is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url) or url.startswith("file://")


def expand_shards(pattern: str) -> list[str]:
    """Expand brace patterns; several patterns may be joined with '::'. Local shards must exist."""
    if not pattern:
        raise UserError("no shards given (data.train_shards / eval.shards is empty)")
    urls: list[str] = []
    for part in pattern.split("::"):
        urls.extend(braceexpand.braceexpand(part))
    local = [u[len("file://"):] if u.startswith("file://") else u for u in urls if is_local(u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if local and len(missing) == len(urls):
        raise UserError(f"shard pattern '{pattern}' matches no file (first: {missing[0]})")
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UserError(f"{len(missing)} of {len(urls)} shards of '{pattern}' do not exist: {shown}")
    return urls


def _raise(exn: Exception) -> bool:
    raise exn


def iter_shard(url: str) -> Iterator[dict]:
    """Raw samples of one shard: {'__key__', '__url__', ext: bytes, ...}; undecoded."""
    try:
        stream = gopen(url[len("file://"):] if url.startswith("file://") else url)
        files = tar_file_expander([{"url": url, "stream": stream}], handler=_raise)
        for sample in group_by_keys(files, handler=_raise):
            yield sample
    except Exception as e:  # noqa: BLE001 - any failure to read a shard names the shard
        if isinstance(e, ShardError):
            raise
        raise ShardError(f"cannot read shard {url}: {type(e).__name__}: {e.args[0] if e.args else e}"
                         ) from None
