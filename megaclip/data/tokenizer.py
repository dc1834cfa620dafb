"""SentencePiece tokenisation to a fixed context length: [BOS] pieces... [EOS] [PAD]...

Special ids come from the model file. The end-of-text index travels with each caption so the
text tower never needs to know a token id.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import sentencepiece as spm
import torch

from megaclip.errors import UserError


class Tokenizer:
    def __init__(self, model_path: str, context_length: int):
        if not model_path or not os.path.isfile(model_path):
            raise UserError(f"tokenizer model '{model_path}' does not exist "
                            f"(train one with tools/train_tokenizer.py)")
        if context_length < 3:
            raise UserError(f"context length {context_length} is too short (need >= 3)")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.context_length = context_length
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise UserError(f"tokenizer {model_path} has no BOS/EOS pieces; train it with "
                            f"tools/train_tokenizer.py")
        # Padding after the end-of-text token is never attended to (causal mask) nor pooled.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __getstate__(self):  # DataLoader workers receive the path, not the C++ object
        return {"model_path": self.model_path, "context_length": self.context_length}

    def __setstate__(self, state):
        self.__init__(state["model_path"], state["context_length"])

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (tokens (B, L) int64, end-of-text index (B,) int64)."""
        pieces = self.sp.encode(list(texts))
        L = self.context_length
        tokens = torch.full((len(texts), L), self.pad_id, dtype=torch.long)
        eot = torch.empty(len(texts), dtype=torch.long)
        for i, ids in enumerate(pieces):
            seq = [self.bos_id] + ids[: L - 2] + [self.eos_id]
            tokens[i, : len(seq)] = torch.tensor(seq)
            eot[i] = len(seq) - 1
        return tokens, eot


def train_sentencepiece(captions: Iterable[str], model_prefix: str, vocab_size: int,
                        model_type: str = "bpe", max_sentences: int = 2_000_000) -> str:
    """Train a SentencePiece model on ``captions``; returns the ``.model`` path.

    Ids: pad 0, unk 1, bos 2, eos 3 (readers take them from the file, not from here).
    """
    os.makedirs(os.path.dirname(model_prefix) or ".", exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_prefix=model_prefix, vocab_size=vocab_size,
        model_type=model_type, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        character_coverage=1.0, hard_vocab_limit=False, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, minloglevel=2)
    return model_prefix + ".model"
