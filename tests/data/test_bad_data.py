"""Bad data never ends a run silently or for one shard: bad shards skipped, counted and named,
a limit that turns a broken dataset into a clear error, no silent hang on a wrong caption key or
a stalled loader, bounded memory, no decoder outside the configured formats; and a resumed
stream reads about one block and one shard, however far it had got."""
import io
import logging
import os
import random
import tarfile

import pytest
import torch
from PIL import EpsImagePlugin, Image

from megaclip.config import DataConfig
from megaclip.data.tokenizer import Tokenizer
from megaclip.data.stream import TrainStream, bad_shards_over_limit, build_train_loader
from megaclip.make.writer import write_shards
from megaclip.errors import FatalError, UserError


def _jpeg(i, side=24):
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10 * i % 255, 80, 120)).save(buf, format="JPEG")
    return buf.getvalue()


def _good(i):
    return {"__key__": f"k{i:05d}", "jpg": _jpeg(i), "txt": f"sample {i}"}


def _shards(tmp_path, count, per_shard, name="good"):
    return write_shards((_good(i) for i in range(count * per_shard)), str(tmp_path / name),
                        maxcount=per_shard)


@pytest.fixture(scope="module")
def tokenizer(synthetic):
    return Tokenizer(str(synthetic / "spm.model"), 16)


def _cfg(**kw):
    base = dict(train_shards="unused", resampled=False, shuffle_buffer=0, workers=0,
                crop_scale=(0.8, 1.0), log_bad_samples=0, max_bad_shard_fraction=1.0)
    base.update(kw)
    return DataConfig(**base)


def _batches(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def _error(stream, most=100):
    for _, batch in zip(range(most), stream):
        if "error" in batch:
            return batch["error"]
    raise AssertionError(f"no error in {most} batches")


def _damaged(tmp_path, source):
    """A truncated shard, one cut inside a header, and a pipe failing after some output."""
    with open(source, "rb") as f:
        data = f.read()
    with tarfile.open(source) as t:
        members = t.getmembers()
    cut = str(tmp_path / "cut-member.tar")
    with open(cut, "wb") as f:
        f.write(data[:members[5].offset_data + 50])
    header = str(tmp_path / "cut-header.tar")
    with open(header, "wb") as f:
        f.write(data[:members[5].offset + 100])
    return [cut, header, f"pipe:head -c {len(data) // 2} {source}; exit 3"]


def test_bad_shards_are_skipped_counted_and_named(tmp_path, tokenizer, caplog):
    good = _shards(tmp_path, 4, 10)
    doomed = _shards(tmp_path, 1, 10, name="doomed")[0]
    urls = good + _damaged(tmp_path, good[0]) + [doomed]
    stream = TrainStream(_cfg(), 16, tokenizer, 4, 0, 1, urls=urls)
    os.remove(doomed)  # deleted after the shard list was checked
    with caplog.at_level(logging.WARNING, logger="megaclip.data"):
        batches = _batches(stream, 24)  # more than an epoch: every shard was read
    assert "error" not in batches[-1]
    log = caplog.text
    assert batches[-1]["skipped"]["shards"] == log.count("skipping shard") >= 4
    assert f"skipping shard {urls[4]} (rank 0 worker 0): ReadError: unexpected end of data" in log
    assert f"skipping shard {urls[5]} (rank 0 worker 0): ReadError: truncated inside a header" in log
    assert f"skipping shard {urls[6]} (rank 0 worker 0): command exited with status 3" in log
    assert f"skipping shard {doomed} (rank 0 worker 0): file does not exist" in log


def test_the_bad_shard_limit_trips_on_broken_data_not_on_chance():
    assert not bad_shards_over_limit(1, 1, 0.01)  # one early bad shard is no verdict
    assert not bad_shards_over_limit(10, 1000, 0.01) and bad_shards_over_limit(30, 1000, 0.01)
    assert bad_shards_over_limit(8, 16, 0.1)  # half of them
    assert bad_shards_over_limit(1, 1000, 0.0) and not bad_shards_over_limit(900, 1000, 1.0)
    # 512 workers' worth of shards from a dataset at half the limit: never tripped by chance.
    rng = random.Random(0)
    for _ in range(200):
        read = rng.randrange(1, 20000)
        bad = sum(rng.random() < 0.005 for _ in range(read))
        assert not bad_shards_over_limit(bad, read, 0.01), (bad, read)


def test_a_run_of_failing_shards_ends_the_stream_with_their_names(tmp_path, tokenizer):
    good = _shards(tmp_path, 1, 10)
    broken = [str(tmp_path / f"gone-{i}.tar") for i in range(30)]
    stream = TrainStream(_cfg(resampled=True), 16, tokenizer, 4, 0, 1, urls=good + broken)
    error = _error(stream)
    assert error.startswith("20 shards in a row failed for rank 0 worker 0: ")
    assert "gone-" in error and "file does not exist" in error


def test_a_wrong_caption_key_names_what_the_samples_have(tmp_path, tokenizer, synthetic):
    cfg = _cfg(train_shards=str(synthetic / "train" / "shard-{000000..000003}.tar"),
               caption_key="caption", max_bad_samples_in_a_row=500, resampled=True)
    loader = build_train_loader(cfg, 16, tokenizer, 4, 0, 1)
    with pytest.raises(UserError, match=r"\d+ samples in a row could not be used .*"
                                        r"no '\.caption' member; samples have: jpg, txt"):
        next(iter(loader))


def test_an_eps_member_is_undecodable_and_never_reaches_ghostscript(tmp_path, tokenizer,
                                                                  monkeypatch):
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 24 24\nnewpath 0 0 moveto 24 24 lineto "
           b"stroke showpage\n%%EOF\n")
    assert Image.open(io.BytesIO(eps)).format == "EPS"  # what PIL would do on its own
    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1))
    urls = write_shards([{"__key__": "eps", "jpg": eps, "txt": "x"}, _good(0), _good(1)],
                        str(tmp_path))
    batch = next(iter(TrainStream(_cfg(), 16, tokenizer, 2, 0, 1, urls=urls)))
    assert batch["skipped"]["undecodable_image"] == 1 and opened == []


def test_oversize_members_and_long_captions_are_skipped_and_counted(tmp_path, tokenizer):
    samples = [{"__key__": "big", "jpg": _jpeg(1, side=200), "txt": "x"},
               {"__key__": "long", "jpg": _jpeg(2), "txt": "word " * 100}, _good(0), _good(1)]
    urls = write_shards(samples, str(tmp_path))
    cfg = _cfg(max_member_bytes=len(_jpeg(1, side=200)) - 1, max_caption_bytes=100)
    batch = next(iter(TrainStream(cfg, 16, tokenizer, 2, 0, 1, urls=urls)))
    assert batch["skipped"] == {"member_too_large": 1, "caption_too_long": 1, "shards": 0}


def test_a_stalled_loader_names_the_worker_and_its_shard(tmp_path, tokenizer):
    good = _shards(tmp_path, 1, 10)[0]
    url = f"pipe:sleep 20; cat {good}"
    loader = build_train_loader(_cfg(workers=1, loader_timeout_s=2, resampled=True), 16,
                                tokenizer, 4, 0, 1, urls=[url])
    with pytest.raises(FatalError, match=r"no batch for 2 s .*DataLoader worker 0: reading "
                                         + url.replace("(", r"\(").split(";")[0]):
        next(iter(loader))


class _MemberCount:
    def __init__(self, monkeypatch):
        self.n, original = 0, tarfile.TarFile.next

        def counting(tar):
            info = original(tar)
            self.n += info is not None
            return info
        monkeypatch.setattr(tarfile.TarFile, "next", counting)


@pytest.mark.parametrize("resampled", [True, False])
def test_resume_reads_a_block_and_a_shard_and_continues_exactly(tmp_path, tokenizer, monkeypatch,
                                                               resampled):
    good = _shards(tmp_path, 9, 30)
    urls = good + _damaged(tmp_path, good[0])[:1]
    cfg = _cfg(resampled=resampled, shuffle_buffer=40)
    loader = build_train_loader(cfg, 16, tokenizer, 4, 0, 1, urls=urls)
    it = iter(loader)
    for _ in range(300):  # 1200 samples: several epochs and blocks
        next(it)
    saved = loader.state.state_dict()
    expected = [next(it) for _ in range(3)]
    count = _MemberCount(monkeypatch)
    resumed = next(iter(build_train_loader(cfg, 16, tokenizer, 4, 0, 1, state=saved, urls=urls)))
    # Two members per sample; at most: the block, what was read ahead of the next one, the part
    # of the first shard before the block began, and the batch.
    assert count.n // 2 <= 2 * 40 + 30 + 4
    assert torch.equal(resumed["images"], expected[0]["images"])
    assert torch.equal(resumed["tokens"], expected[0]["tokens"])
    assert resumed["skipped"] == expected[0]["skipped"]
    assert resumed["position"] == expected[0]["position"]
