#!/usr/bin/env python
"""Train a SentencePiece tokenizer on captions read from WebDataset shards or a text file.

Writes PREFIX.model and PREFIX.vocab (trained beside them, then renamed into place). A tokenizer
already there is refused unless --force: runs and checkpoints trained with it would read other
token ids from the same path (they record its sha256 and refuse a changed file)."""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
from typing import Iterator

from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: the package beside it, not an installed one
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaclip.data.decode import BadSample, decode_caption  # noqa: E402
from megaclip.data.shards import expand_shards, iter_shard  # noqa: E402
from megaclip.data.tokenizer import train_sentencepiece  # noqa: E402
from megaclip.errors import UserError, run_cli  # noqa: E402
from megaclip.outputs import check_out, install, partial_beside  # noqa: E402

EXAMPLE = """examples:
  python tools/train_tokenizer.py --shards 'data/synthetic/train/shard-{000000..000019}.tar' \\
      --out data/synthetic/spm --vocab-size 256
  python tools/train_tokenizer.py --text captions.txt --out spm32k --vocab-size 32000
  python tools/train_tokenizer.py --text captions.txt --out spm32k --vocab-size 32000 --force
  (the last replaces spm32k.model and spm32k.vocab)
"""


def captions_from_shards(pattern: str, key: str) -> Iterator[str]:
    for url in expand_shards(pattern):
        for sample in iter_shard(url):
            try:
                yield decode_caption(sample, key)
            except BadSample:
                continue


def captions_from_text(path: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    yield line.strip()
    except FileNotFoundError:
        raise UserError(f"text file '{path}' does not exist") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="brace pattern of WebDataset shards")
    src.add_argument("--text", help="a text file, one caption per line")
    p.add_argument("--out", required=True, help="model prefix: writes PREFIX.model, PREFIX.vocab "
                                                "(new; see --force)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--caption-key", default="txt")
    p.add_argument("--model-type", default="bpe", choices=["unigram", "bpe"])
    p.add_argument("--max-captions", type=int, default=2_000_000)
    args = p.parse_args(argv)
    if args.vocab_size < 8:
        raise UserError("--vocab-size must be at least 8")
    outputs = [args.out + ".model", args.out + ".vocab"]
    check_out(outputs, args.force, folder=False)
    captions = (captions_from_shards(args.shards, args.caption_key) if args.shards
                else captions_from_text(args.text))
    captions = list(tqdm(itertools.islice(captions, args.max_captions), desc="captions",
                         unit="cap", mininterval=1.0))
    if not captions:
        raise UserError("no captions found")
    tmp = partial_beside(args.out)
    try:
        prefix = os.path.join(tmp, os.path.basename(args.out))
        train_sentencepiece(captions, prefix, args.vocab_size, args.model_type,
                            args.max_captions)
        check_out(outputs, args.force, folder=False)  # none appeared while it trained
        for path in outputs:
            install(prefix + os.path.splitext(path)[1], path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    path = outputs[0]
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=path)
    print(f"wrote {path}: {sp.get_piece_size()} pieces from {len(captions)} captions "
          f"(pad {sp.pad_id()}, bos {sp.bos_id()}, eos {sp.eos_id()})")
    return 0


if __name__ == "__main__":
    run_cli(main)
