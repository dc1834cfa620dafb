"""Several captions per sample: which members a sample's captions need, and the choice of one.

Shards from img2dataset and re-captioning pipelines carry several texts: ``txt``, and fields of
the ``json`` member with synthetic captions. ``data.caption_keys`` gives member keys and
``json:<field>`` keys with probabilities; each sample draws one from its own seed, among the
captions it has: a missing member or field, a malformed ``json``, a caption that is empty, not
UTF-8 or over ``data.max_caption_bytes`` makes that choice unavailable, and a sample with none
left is skipped as a bad sample (the kind of its first key's failure). The ``json`` member is
read under the same byte caps as any member, refused above 4 x ``data.max_caption_bytes`` before
it is parsed, parsed once per sample, and never evaluated.
"""
from __future__ import annotations

import json
from typing import Optional

from megaclip.data.decode import BadSample, _oversize, decode_caption

JSON_PREFIX = "json:"
JSON_MEMBER = "json"
JSON_CAPTIONS = 4  # a json member holds up to this many captions' bytes (data.max_caption_bytes)


def caption_members(keys: tuple) -> frozenset:
    """The members ``keys`` ((key, probability) pairs) read: the keys, ``json`` for fields."""
    return frozenset(JSON_MEMBER if k.startswith(JSON_PREFIX) else k for k, _ in keys)


def _json_object(sample: dict, max_bytes: int) -> dict:
    """The sample's ``json`` member parsed, refused unparsed above ``max_bytes`` (parsing takes
    many times the text's size in memory)."""
    _oversize(sample, (JSON_MEMBER,))
    raw = sample.get(JSON_MEMBER)
    if raw is None:
        raise BadSample("missing_caption", f"no '.{JSON_MEMBER}' member")
    if len(raw) > JSON_CAPTIONS * max_bytes:
        raise BadSample("member_too_large", f"'.{JSON_MEMBER}' of {len(raw)} bytes is over "
                                            f"{JSON_CAPTIONS} x data.max_caption_bytes")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deep
        raise BadSample("malformed_json", f"{type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise BadSample("malformed_json", f"a JSON {type(obj).__name__}, not an object")
    return obj


def read_caption(sample: dict, key: str, max_bytes: int, parsed: Optional[dict] = None) -> str:
    """The caption of ``key`` (a member, or ``json:<field>``); raises ``BadSample`` when the
    sample does not have a usable one. ``parsed`` caches the sample's parsed ``json`` member
    (or the ``BadSample`` it gave) between keys."""
    if not key.startswith(JSON_PREFIX):
        return decode_caption(sample, key, max_bytes)
    parsed = {} if parsed is None else parsed
    if "obj" not in parsed:
        try:
            parsed["obj"] = _json_object(sample, max_bytes)
        except BadSample as err:
            parsed["obj"] = err
    obj = parsed["obj"]
    if isinstance(obj, BadSample):
        raise obj
    field = key[len(JSON_PREFIX):]
    value = obj.get(field)
    if not isinstance(value, str):
        raise BadSample("missing_caption", f"no text field '{field}' in '.{JSON_MEMBER}'")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate escaped in the JSON
        raise BadSample("caption_not_utf8", str(e)) from None
    return decode_caption({key: raw}, key, max_bytes)


def choose_caption(sample: dict, keys: tuple, u: float, max_bytes: int) -> str:
    """One caption of ``sample`` from ``keys`` ((key, probability) pairs): with one key, that
    one (as ``decode_caption``); otherwise drawn with ``u`` (uniform in [0, 1), from the
    sample's seed) by probability among the keys the sample has a usable caption for. None
    usable: the ``BadSample`` of the first key, naming every key's failure."""
    if len(keys) == 1:
        return read_caption(sample, keys[0][0], max_bytes)
    parsed: dict = {}
    usable, failed = [], []
    for key, weight in keys:
        try:
            usable.append((read_caption(sample, key, max_bytes, parsed), weight))
        except BadSample as err:
            failed.append((key, err))
    if not usable:
        detail = "; ".join(f"{key}: {err}" for key, err in failed)
        raise BadSample(failed[0][1].kind, f"no usable caption ({detail})")
    target, total = u * sum(w for _, w in usable), 0.0
    for text, weight in usable:
        total += weight
        if target < total:
            return text
    return usable[-1][0]  # u * sum rounded up to the sum itself
