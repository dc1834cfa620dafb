"""The data section's sources and caption keys (``data.sources``, ``data.caption_keys``): their
types, how a file or an override spells them, and their checks. ``megaclip/config.py`` holds the
data section itself and builds these from it."""
from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Any, Optional

from megaclip.errors import UserError

# (member key or json:<field>, probability) pairs; a mapping or a list of keys is read as them.
CaptionKeys = typing.Tuple[typing.Tuple[str, float], ...]
SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # it names metrics: data/<name>/samples


@dataclass(frozen=True)
class SourceConfig:
    """One source of ``data.sources``; unset fields take the data section's value."""
    name: str = ""
    shards: str = ""  # a brace pattern, '::'-joined patterns, pipe: commands or URLs
    weight: float = 1.0  # relative; the weights of the sources that have samples left are used
    caption_keys: CaptionKeys = ()  # empty: data.caption_keys, else data.caption_key
    resampled: Optional[bool] = None  # None: data.resampled
    epochs: int = 0  # without resampling: passes over its shards before it runs out; 0: endless


def caption_choices(keys: Any, where: str) -> tuple:
    """Caption keys as given (a mapping of key -> probability, a list of keys, or a list of
    [key, probability] pairs, as the resolved config.yaml writes them) as (key, probability)
    pairs; ``where`` names the config key in errors."""
    if isinstance(keys, dict):
        pairs = list(keys.items())
    elif isinstance(keys, (list, tuple)):
        pairs = [tuple(k) if isinstance(k, (list, tuple)) else (k, 1.0) for k in keys]
    else:
        raise UserError(f"config key '{where}' must be a mapping of caption key -> probability "
                        f"or a list of keys, got {keys!r}")
    out = []
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str) or not pair[0]:
            raise UserError(f"config key '{where}': {pair!r} is not a caption key with a "
                            f"probability")
        p = pair[1]
        if isinstance(p, str):  # YAML 1.1 reads "3e-1" (no dot) as a string
            try:
                p = float(p)
            except ValueError:
                pass
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise UserError(f"config key '{where}.{pair[0]}' must be a number, got {p!r}")
        out.append((pair[0], float(p)))
    return tuple(out)


def validate_data_sources(data, check) -> None:
    """Caption keys and sources of the data section ``data``: each key once with a probability
    > 0, json:<field> naming a field; unique source names usable in metric names, weights > 0,
    shards given, epochs only without resampling; train_shards or sources, not both."""
    def keys_ok(keys: tuple, where: str) -> None:
        names = [k for k, _ in keys]
        check(len(set(names)) == len(names), f"{where}: a caption key is given twice: {names}")
        for key, p in keys:
            check(p > 0, f"{where}: the probability of '{key}' must be > 0, got {p:g}")
            check(key != "json:" and not key.startswith("__"),
                  f"{where}: '{key}' is not a caption key (a member, or json:<field>)")

    keys_ok(data.caption_keys, "data.caption_keys")
    check(data.on_source_exhausted in ("drop", "stop"),
          f"data.on_source_exhausted must be drop or stop, got '{data.on_source_exhausted}'")
    if not data.sources:
        return
    check(not data.train_shards, "data.train_shards and data.sources are both set: use one "
          "(data.train_shards= empties it)")
    names = [s.name for s in data.sources]
    for i, s in enumerate(data.sources):
        where = f"data.sources[{i}]" + (f" ('{s.name}')" if s.name else "")
        check(bool(SOURCE_NAME.fullmatch(s.name)),
              f"{where}: name must be letters, digits, '_', '.' or '-', got '{s.name}'")
        check(names.count(s.name) == 1, f"{where}: the name '{s.name}' is used twice")
        check(s.weight > 0, f"{where}: weight must be > 0, got {s.weight:g}")
        check(bool(s.shards), f"{where}: shards is empty")
        check(s.epochs >= 0, f"{where}: epochs must be >= 0")
        resampled = data.resampled if s.resampled is None else s.resampled
        check(not (s.epochs and resampled), f"{where}: epochs={s.epochs} needs resampled=false "
              f"(a resampled source never runs out)")
        keys_ok(s.caption_keys, f"{where}.caption_keys")
