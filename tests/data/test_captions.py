"""Several captions per sample (data.caption_keys): the choice follows the probabilities among
the captions a sample has, is the same for the same sample seed (and so after a resume), reads
json fields under the member caps, and a malformed json or a missing field makes a choice
unavailable, never a crash."""
import io
import json

import pytest
import torch
from PIL import Image

from megaclip.config import DataConfig, load_config
from megaclip.data.captions import caption_members, choose_caption
from megaclip.data.decode import BadSample
from megaclip.data.shard_order import derive_seed
from megaclip.data.stream import build_train_loader
from megaclip.data.tokenizer import Tokenizer
from megaclip.errors import UserError
from megaclip.make.writer import write_shards

KEYS = (("txt", 0.5), ("json:caption_2", 0.3), ("json:caption_3", 0.2))


def _u(seed):
    return derive_seed(seed, 6) / 2.0 ** 63


def _sample(**json_fields):
    return {"__key__": "k", "txt": b"the txt caption",
            "json": json.dumps(json_fields).encode()}


def test_the_choice_follows_the_probabilities_and_the_seed():
    sample = _sample(caption_2="second", caption_3="third", url="http://x")
    picks = [choose_caption(sample, KEYS, _u(seed), 1 << 20) for seed in range(6000)]
    shares = {text: picks.count(text) / len(picks) for text in set(picks)}
    assert abs(shares["the txt caption"] - 0.5) < 0.02
    assert abs(shares["second"] - 0.3) < 0.02 and abs(shares["third"] - 0.2) < 0.02
    # The same seed, the same caption (a resumed stream draws the same one).
    assert picks[:50] == [choose_caption(sample, KEYS, _u(seed), 1 << 20) for seed in range(50)]


def test_unavailable_choices_fall_back_among_the_others():
    missing = _sample(caption_2="second")  # no caption_3: txt 5/8, caption_2 3/8
    picks = [choose_caption(missing, KEYS, _u(seed), 1 << 20) for seed in range(4000)]
    assert set(picks) == {"the txt caption", "second"}
    assert abs(picks.count("second") / len(picks) - 0.375) < 0.03
    for raw in (b'{"caption_2": "cut', b"[1, 2]", b"\xff\xfe", b'{"caption_2": 7}',
                b'{"caption_2": "\\ud800 lone surrogate"}', b"[" * 100_000):
        broken = {"__key__": "k", "txt": b"the txt caption", "json": raw}
        assert {choose_caption(broken, KEYS, _u(s), 1 << 20) for s in range(20)} == \
            {"the txt caption"}
    only_json = {"__key__": "k", "json": b'{"caption_3": "third"}'}
    assert choose_caption(only_json, KEYS, 0.99, 1 << 20) == "third"


def test_a_sample_with_no_usable_caption_is_a_bad_sample():
    with pytest.raises(BadSample) as err:
        choose_caption({"__key__": "k", "json": b"not json"}, KEYS, 0.5, 1 << 20)
    assert err.value.kind == "missing_caption" and "malformed" not in err.value.kind
    assert "json:caption_2: malformed_json" in str(err.value)
    with pytest.raises(BadSample) as err:
        choose_caption({"__key__": "k", "json": b"not json"}, (("json:caption_2", 1.0),), 0.5,
                       1 << 20)
    assert err.value.kind == "malformed_json"
    oversize = {"__key__": "k", "__oversize__": ["json"], "__unread__": []}
    with pytest.raises(BadSample) as err:
        choose_caption(oversize, (("json:c", 1.0),), 0.5, 1 << 20)
    assert err.value.kind == "member_too_large"
    with pytest.raises(BadSample, match="caption_too_long"):
        choose_caption(_sample(c="x" * 100), (("json:c", 1.0),), 0.5, 50)
    # a json member over 4 captions' bytes is refused before it is parsed (memory)
    huge = {"__key__": "k", "json": b"[" + b"{}," * 1000 + b"{}]"}
    with pytest.raises(BadSample) as err:
        choose_caption(huge, (("json:c", 1.0),), 0.5, 500)
    assert err.value.kind == "member_too_large" and "over 4 x data.max_caption_bytes" in str(err.value)


def test_config_reads_a_mapping_or_a_list_of_keys():
    cfg = load_config(None, ['data.caption_keys={txt: 0.7, "json:caption_2": 0.3}'])
    assert cfg.data.caption_keys == (("txt", 0.7), ("json:caption_2", 0.3))
    cfg = load_config(None, ['data.caption_keys=[txt, "json:c"]'])
    assert cfg.data.caption_keys == (("txt", 1.0), ("json:c", 1.0))
    assert caption_members(cfg.data.caption_keys) == {"txt", "json"}
    for bad, why in (("{txt: 0}", "probability of 'txt' must be > 0"),
                     ("[txt, txt]", "given twice"), ('["json:"]', "is not a caption key"),
                     ("7", "must be a mapping")):
        with pytest.raises(UserError, match=why):
            load_config(None, [f"data.caption_keys={bad}"])


def _jpeg(i):
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (10 * i % 255, 80, 120)).save(buf, format="JPEG")
    return buf.getvalue()


def test_a_stream_draws_the_same_captions_after_a_resume(tmp_path, synthetic):
    """Captions from txt and from a json field reach the batches, the json one only where the
    sample has it, and a resumed stream draws the same ones."""
    def sample(i):
        fields = {"caption_2": f"json caption {i}"} if i % 4 else {}
        return {"__key__": f"k{i:05d}", "jpg": _jpeg(i), "txt": f"txt caption {i}",
                "json": (json.dumps(fields) if i % 9 != 4 else '{"cut').encode()}
    paths = write_shards((sample(i) for i in range(120)), str(tmp_path), maxcount=40)
    pattern = paths[0].replace("000000", "{000000..000002}")
    cfg = DataConfig(train_shards=pattern, shuffle_buffer=20, workers=0, crop_scale=(0.8, 1.0),
                     caption_keys=(("txt", 0.5), ("json:caption_2", 0.5)), log_bad_samples=0)
    tokenizer = Tokenizer(str(synthetic / "spm.model"), 16)
    seen = []
    encode = tokenizer.encode
    tokenizer.encode = lambda captions: (seen.append(list(captions)), encode(captions))[1]

    loader = build_train_loader(cfg, 16, tokenizer, 8, rank=0, world_size=1)
    it = iter(loader)
    first = [next(it) for _ in range(6)]
    saved = loader.state.state_dict()
    first += [next(it) for _ in range(4)]
    run_captions, seen[:] = list(seen), []
    it = iter(build_train_loader(cfg, 16, tokenizer, 8, rank=0, world_size=1, state=saved))
    again = [next(it) for _ in range(4)]
    assert seen == run_captions[6:10]
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(first[6:], again))
    texts = [t for batch in run_captions for t in batch]
    from_json = [int(t.split()[-1]) for t in texts if t.startswith("json")]
    assert 0.15 < len(from_json) / len(texts) < 0.5  # 0.5 x the 2/3 that have caption_2
    assert all(i % 4 and i % 9 != 4 for i in from_json)
    assert first[-1]["skipped"] == {"shards": 0}  # every sample has its txt
