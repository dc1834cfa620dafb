"""Weighted mixtures of sources (data.sources): the draws follow the weights and can be found
from any position, each worker's usable samples come from the drawn sources (however many of a
source's samples are bad), counted per source, a resumed stream goes on exactly, and a source
that runs out is dropped, or ends the run, as configured."""
import io
import logging
import pytest
import torch
from PIL import Image

from megaclip.config import load_config
from megaclip.data.mixture import draw_source
from megaclip.data.shard_order import derive_seed
from megaclip.data.stream import build_train_loader
from megaclip.data.tokenizer import Tokenizer
from megaclip.errors import UserError
from megaclip.make.writer import write_shards
from tests.data.recaption import recaption


@pytest.fixture(scope="module")
def tokenizer(synthetic):
    return Tokenizer(str(synthetic / "spm.model"), 16)


@pytest.fixture(scope="module")
def recaptioned(synthetic, tmp_path_factory):
    """The synthetic training set with other captions (txt reworded, json fields)."""
    out = tmp_path_factory.mktemp("recaptioned")
    recaption(str(synthetic / "train"), str(out))
    return out


def _data(sources, *extra):
    items = ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in s.items()) + "}" for s in sources)
    return load_config(None, [f"data.sources=[{items}]", "data.crop_scale=[0.8,1.0]",
                              "data.log_bad_samples=0", *extra]).data


def test_draws_follow_the_weights_and_any_draw_is_found_alone():
    for weights in ([0.8, 0.2], [5.0, 3.0, 2.0]):
        draws = [draw_source(7, 1, 0, n, weights) for n in range(20000)]
        for i, w in enumerate(weights):
            assert abs(draws.count(i) / len(draws) - w / sum(weights)) < 0.02, (weights, i)
    # Resumable: draw n depends on (seed, rank, worker, n) only; ranks and workers differ.
    a = [draw_source(7, 0, 0, n, [1, 1]) for n in range(200)]
    assert a[100:] == [draw_source(7, 0, 0, n, [1, 1]) for n in range(100, 200)]
    assert a != [draw_source(7, 1, 0, n, [1, 1]) for n in range(200)]
    assert a != [draw_source(7, 0, 1, n, [1, 1]) for n in range(200)]
    # A source without samples left is never drawn; the others keep their ratio.
    assert {draw_source(7, 0, 0, n, [0.0, 0.3, 0.7]) for n in range(300)} == {1, 2}
    with pytest.raises(LookupError):
        draw_source(7, 0, 0, 0, [0.0, 0.0])


def test_a_mixture_counts_resumes_and_keeps_its_weights_over_bad_samples(
        synthetic, recaptioned, tokenizer):
    """Source b takes its caption from a json field that a third of its samples lack or hold
    malformed: those are skipped and counted for b, and b still gives exactly the samples its
    draws asked for."""
    cfg = _data([dict(name="a", shards=f"'{synthetic}/train/shard-{{000000..000003}}.tar'",
                      weight=0.7),
                 dict(name="b", shards=f"'{recaptioned}/shard-{{000000..000003}}.tar'",
                      weight=0.3, caption_keys='["json:caption_3"]')],
                "data.shuffle_buffer=30", "data.workers=2")
    loader = build_train_loader(cfg, 32, tokenizer, 8, rank=1, world_size=2)
    it = iter(loader)
    batches = [next(it) for _ in range(8)]
    saved = loader.state.state_dict()
    batches += [next(it) for _ in range(4)]
    totals = loader.state.source_totals()
    loader.close()
    assert sum(t[0] for t in totals.values()) == 12 * 8
    assert totals["a"][1] == 0 and totals["b"][1] > 0  # bad samples: b's alone
    assert batches[-1]["skipped"]["missing_caption"] + batches[-1]["skipped"].get(
        "malformed_json", 0) > 0
    # Each worker's counts are exactly those of its draws (the stream's seed, rank 1).
    seed = derive_seed(cfg.seed, 0)
    for wid, position in loader.state.positions.items():
        n = position["draws"]
        drawn_b = sum(draw_source(seed, 1, wid, i, [0.7, 0.3]) for i in range(n))
        assert loader.state.sources[wid]["b"][0] == drawn_b
        assert loader.state.sources[wid]["a"][0] == n - drawn_b
    resumed = build_train_loader(cfg, 32, tokenizer, 8, rank=1, world_size=2, state=saved)
    it = iter(resumed)
    again = [next(it) for _ in range(4)]
    assert resumed.state.source_totals() == totals
    resumed.close()
    for a, b in zip(again, batches[8:]):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"])
        assert a["sources"] == b["sources"] and a["position"] == b["position"]


def _jpeg(i):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10 * i % 255, 80, 120)).save(buf, format="JPEG")
    return buf.getvalue()


def _small_set(path, count, per_shard, word):
    samples = ({"__key__": f"{word}{i:05d}", "jpg": _jpeg(i), "txt": f"{word} {i}"}
               for i in range(count))
    paths = write_shards(samples, str(path), maxcount=per_shard)
    return paths[0].replace("000000", "{000000..%06d}" % (len(paths) - 1))


def test_a_source_that_runs_out_is_dropped_or_ends_the_run(tmp_path, tokenizer, caplog):
    endless = _small_set(tmp_path / "a", 40, 20, "endless")
    finite = _small_set(tmp_path / "b", 20, 10, "finite")  # one epoch: 20 samples
    sources = [dict(name="a", shards=f"'{endless}'", weight=1),
               dict(name="b", shards=f"'{finite}'", weight=1, resampled="false", epochs=1)]
    cfg = _data(sources, "data.workers=0", "data.shuffle_buffer=8")
    with caplog.at_level(logging.WARNING, logger="megaclip.data"):
        loader = build_train_loader(cfg, 16, tokenizer, 4, rank=0, world_size=1)
        it = iter(loader)
        batches = [next(it) for _ in range(15)]
    assert any("source 'b' ran out for rank 0 worker 0 after 20 samples (1 epoch(s)); dropped"
               in r.message for r in caplog.records)
    assert loader.state.source_totals()["b"] == [20, 0, 0]
    assert loader.state.positions[0]["ended"] == ["b"]
    assert all("ended" not in b for b in batches)
    # Resumed after the end: b stays out, the stream goes on as it did.
    saved_at = 12
    loader = build_train_loader(cfg, 16, tokenizer, 4, rank=0, world_size=1)
    it = iter(loader)
    for _ in range(saved_at):
        next(it)
    saved = loader.state.state_dict()
    assert loader.state.positions[0]["ended"] == ["b"]
    again = build_train_loader(cfg, 16, tokenizer, 4, rank=0, world_size=1, state=saved)
    it = iter(again)
    for b in batches[saved_at:]:  # the same samples, and the same counters (shards included)
        r = next(it)
        assert torch.equal(r["tokens"], b["tokens"])
        assert (r["shards_read"], r["sources"]) == (b["shards_read"], b["sources"])

    stop = _data(sources, "data.workers=0", "data.shuffle_buffer=8",
                 "data.on_source_exhausted=stop")
    loader = build_train_loader(stop, 16, tokenizer, 4, rank=0, world_size=1)
    it = iter(loader)
    notes = [next(it).get("ended") for _ in range(15)]
    ended = [i for i, note in enumerate(notes) if note]
    assert len(ended) == 1 and loader.state.ended == [notes[ended[0]]]
    assert "source 'b' ran out for rank 0 worker 0 after 20 samples" in notes[ended[0]]
    # Every source finite: when the last runs out, an error that says what to do.
    both = _data([dict(s, resampled="false", epochs=1) for s in sources], "data.workers=0",
                 "data.shuffle_buffer=8")
    it = iter(build_train_loader(both, 16, tokenizer, 4, rank=0, world_size=1))
    with pytest.raises(UserError, match=r"every source ran out for rank 0 worker 0 \(b, a\).*stop"):
        for _ in range(20):
            next(it)
    # ... and with stop, the last micro-batch is filled with its own samples and carries the
    # note, then repeats for as long as the loader asks (the run stops at that step's end).
    only_b = _data(sources[1:], "data.workers=0", "data.shuffle_buffer=8",
                   "data.on_source_exhausted=stop")
    loader = build_train_loader(only_b, 16, tokenizer, 3, rank=0, world_size=1)
    it = iter(loader)
    batches = [next(it) for _ in range(10)]
    assert all(b["images"].shape[0] == 3 for b in batches)
    assert [i for i, b in enumerate(batches) if b.get("ended")] == [6]  # 20 samples: 6 x 3 + 2
    assert "source 'b' ran out" in batches[6]["ended"] and loader.state.ended == [batches[6]["ended"]]
    tokens = batches[6]["tokens"]
    assert torch.equal(tokens[2], tokens[0])  # filled with its own first sample
    assert all(torch.equal(b["tokens"], tokens) for b in batches[7:])


def test_sources_config_is_checked():
    good = "{name: a, shards: x.tar}"
    for sources, extra, why in (
            (f"[{good}, {good}]", [], "the name 'a' is used twice"),
            ("[{name: a, shards: x.tar, weight: 0}]", [], r"weight must be > 0"),
            ("[{name: a}]", [], "shards is empty"),
            ("[{name: 'a b', shards: x.tar}]", [], "name must be letters"),
            ("[{name: a, shards: x.tar, epochs: 1}]", [], "epochs=1 needs resampled=false"),
            (f"[{good}]", ["data.train_shards=y.tar"], "data.train_shards and data.sources"),
            (f"[{good}]", ["data.on_source_exhausted=wait"], "drop or stop"),
            ("[{name: a, shards: x.tar, wieght: 1}]", [],
             r"unknown config key 'data.sources\[0\].wieght'.*name, shards, weight"),
            ("[{name: a, shards: x.tar, weight: heavy}]", [],
             r"'data.sources\[0\].weight' must be a number")):
        with pytest.raises(UserError, match=why):
            load_config(None, [f"data.sources={sources}", *extra])
    cfg = load_config("clip_tiny_synthetic", [
        "data.train_shards=", f"data.sources=[{good}, {{name: b, shards: y.tar, weight: 0.5, "
        "resampled: false, epochs: 2, caption_keys: {txt: 1, 'json:c': 3}}]"])
    b = cfg.data.sources[1]
    assert (b.weight, b.resampled, b.epochs, b.caption_keys) == (
        0.5, False, 2, (("txt", 1.0), ("json:c", 3.0)))
    from megaclip.config import config_from_dict, to_dict
    assert config_from_dict(to_dict(cfg)) == cfg  # the resolved config.yaml reads back
