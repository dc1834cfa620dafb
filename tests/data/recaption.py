"""A copy of a shard set with other captions (as re-captioning pipelines write them): ``txt``
reworded and a ``json`` member with synthetic captions, every other member byte for byte."""
import io
import json
import os
import tarfile
from typing import Callable, Optional


def reworded(text: str) -> str:
    body = text.rstrip(".")
    for lead in ("a photo of ", "an image of ", "there are "):
        if body.startswith(lead):
            body = body[len(lead):]
    return f"an image of {body}."


def json_captions(key: str, text: str) -> Optional[bytes]:
    """caption_2 (the original caption) and caption_3 (reworded); every seventh sample's json
    is malformed and every fifth lacks caption_3, so a choice is sometimes unavailable."""
    number = int("".join(c for c in key if c.isdigit()) or 0)
    if number % 7 == 3:
        return b'{"caption_2": "cut short'
    fields = {"caption_2": text, "url": f"https://example.com/{key}.jpg"}
    if number % 5 != 0:
        fields["caption_3"] = "there are " + reworded(text)[len("an image of "):]
    return json.dumps(fields).encode()


def recaption(src_dir: str, out_dir: str,
              json_fn: Callable[[str, str], Optional[bytes]] = json_captions,
              per_shard: int = 0) -> list[str]:
    """Every ``*.tar`` of ``src_dir`` rewritten into ``out_dir`` (its first ``per_shard``
    samples only, if given); returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name in sorted(os.listdir(src_dir)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(src_dir, name)) as src, \
                tarfile.open(os.path.join(out_dir, name), "w") as out:
            keys: list = []
            for info in src.getmembers():
                key, _, ext = info.name.partition(".")
                if key not in keys:
                    keys.append(key)
                if per_shard and len(keys) > per_shard:
                    break
                data = src.extractfile(info).read()
                if ext == "txt":
                    text = data.decode()
                    data = reworded(text).encode()
                    extra = json_fn(key, text)
                    if extra is not None:
                        _add(out, f"{key}.json", extra)
                _add(out, info.name, data)
        written.append(os.path.join(out_dir, name))
    return written


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
