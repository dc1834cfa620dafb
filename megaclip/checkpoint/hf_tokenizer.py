"""A run's SentencePiece tokenizer as a transformers fast tokenizer (``tokenizer.json`` and
``tokenizer_config.json``, no custom code): ``AutoTokenizer.from_pretrained(folder)`` called with
``padding="max_length", truncation=True`` gives megaclip's ids, [BOS] pieces... [EOS] [PAD]...

The pieces come from transformers' own SentencePiece conversion
(``SpmConverter.build_tokenizer_from_spm_proto``: the model's normaliser, dummy prefix and BPE
merges ranked by piece score); megaclip's framing from a post-processor that adds BOS and EOS,
with transformers' truncation (which leaves room for them: the pieces are cut to the context
length - 2) and padding to the context length. Exact for BPE models (tools/train_tokenizer.py's
default). A Unigram model can differ where a caption holds a control piece's text (``</s>``) or
characters outside the vocabulary: transformers' Unigram has no piece types and no fused unknowns.
"""
from __future__ import annotations

import json
from typing import Optional


def special_ids(spm_model: bytes) -> dict[str, int]:
    """megaclip's special ids of a SentencePiece model: bos, eos, pad (the eos without a pad
    piece, as ``data/tokenizer.py``) and unk."""
    proto = _proto(spm_model)
    spec = proto.trainer_spec
    return {"bos": spec.bos_id, "eos": spec.eos_id,
            "pad": spec.pad_id if spec.pad_id >= 0 else spec.eos_id, "unk": spec.unk_id}


def _proto(spm_model: bytes):
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_model)
    return proto


def hf_tokenizer(spm_model: bytes, context_length: int, order: Optional[list[int]] = None,
                 input_names: tuple = ("input_ids", "attention_mask")) -> tuple[str, dict]:
    """(``tokenizer.json`` text, ``tokenizer_config.json`` mapping) of the SentencePiece model
    ``spm_model`` (its bytes), each id ``i`` exported as ``order[i]`` (``convert.hf_token_order``).
    ``input_names``: what a call returns (SigLIP's text tower reads no attention mask)."""
    from tokenizers import Tokenizer, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = _proto(spm_model)
    pieces = [p.piece for p in proto.pieces]
    ids = special_ids(spm_model)
    if min(ids["bos"], ids["eos"]) < 0:
        raise ValueError("the tokenizer has no BOS/EOS pieces; train it with tools/train_tokenizer.py")
    unigram = proto.trainer_spec.model_type == 1
    vocab = ([(p.piece, p.score) for p in proto.pieces] if unigram
             else {piece: i for i, piece in enumerate(pieces)})
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if backend is None:
        raise ValueError(f"transformers cannot convert a SentencePiece model of type "
                         f"{proto.trainer_spec.model_type} (BPE and Unigram only)")
    order = order or list(range(len(pieces)))
    data = json.loads(backend.to_str())
    model = data["model"]
    if unigram:  # a list in id order
        reordered = [None] * len(pieces)
        for i, entry in enumerate(model["vocab"]):
            reordered[order[i]] = entry
        model["vocab"] = reordered
        model["unk_id"] = order[model["unk_id"]]
    else:
        model["vocab"] = {piece: order[i] for piece, i in model["vocab"].items()}
    for token in data.get("added_tokens") or []:
        token["id"] = order[token["id"]]
    backend = Tokenizer.from_str(json.dumps(data))
    bos, eos = pieces[ids["bos"]], pieces[ids["eos"]]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, order[ids["bos"]]), (eos, order[ids["eos"]])])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "pad_token": pieces[ids["pad"]],
        "unk_token": pieces[ids["unk"]], "model_max_length": context_length,
        "padding_side": "right", "truncation_side": "right",
        # SentencePiece reads "</s>" in a caption as text, not as the control piece
        "split_special_tokens": True, "clean_up_tokenization_spaces": False,
        "model_input_names": list(input_names),
    }
    return backend.to_str(), config
