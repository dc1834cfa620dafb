"""Shards and images from anyone: each crafted input below is built here in a few kilobytes (some
are sparse files that read as hundreds of MiB), and none of them ends a run, exhausts memory or
hangs a worker; each is skipped and counted, as a bad sample or a bad shard. Every image decoder
path (training, evaluation, dataset making) has the same pixel limit and formats."""
import gzip
import io
import os
import struct
import subprocess
import sys
import tarfile
import time
import zlib

import pytest
import torch
from PIL import Image

from megaclip.config import DataConfig
from megaclip.data.decode import BadSample, open_bytes
from megaclip.data.eval_set import EvalSet
from megaclip.data.shards import BadShard, read_shard
from megaclip.data.stream import TrainStream, build_train_loader
from megaclip.data.tokenizer import Tokenizer
from megaclip.errors import FatalError, UserError
from megaclip.make.writer import write_shards
from tests.conftest import ROOT, run_tool, synthetic_overrides

MiB = 2**20


def _jpeg(i=0, side=24):
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10 * i % 255, 80, 120)).save(buf, format="JPEG")
    return buf.getvalue()


def _good(i):
    return {"__key__": f"k{i:05d}", "jpg": _jpeg(i), "txt": f"sample {i}"}


def _header(name, size, kind=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _member(name, data):
    return _header(name, len(data)) + data + b"\0" * (-len(data) % 512)


def _tar(*parts, end=True):
    return b"".join(parts) + (b"\0" * 1024 if end else b"")


def _sparse_tar(path, members):
    """A tar whose members of the given sizes are holes in a sparse file: a few KB on disk."""
    with open(path, "wb") as f:
        for name, size in members:
            f.write(_header(name, size))
            f.seek(size + (-size % 512), os.SEEK_CUR)
        f.write(_member("k9.jpg", _jpeg()) + _member("k9.txt", b"after the sparse one"))
        f.write(b"\0" * 1024)
    return str(path)


def _pax_bomb(declared):
    """A pax extended header declaring ``declared`` bytes (only its header is written)."""
    return _header("././@PaxHeader", declared, tarfile.XHDTYPE)


def _huge_png(side=20000):
    """A PNG header claiming side x side pixels; a decoder would need gigabytes."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def tokenizer(synthetic):
    return Tokenizer(str(synthetic / "spm.model"), 16)


def _cfg(**kw):
    return DataConfig(**{"workers": 0, "shuffle_buffer": 0, "resampled": False, **kw})


def _stream(urls, tokenizer, cfg, batch=2):
    return iter(TrainStream(cfg, 16, tokenizer, batch, 0, 1, urls=urls))


# ---------------------------------------------------------------------------- samples
def test_a_member_named_like_the_readers_own_keys_is_ignored(tmp_path, tokenizer):
    crafted = tmp_path / "crafted.tar"
    crafted.write_bytes(_tar(_member("evil.__oversize__", b"jpg"), _member("evil.txt", b"x"),
                             _member("ok.jpg", _jpeg()), _member("ok.txt", b"ok"),
                             _member("ok2.jpg", _jpeg(2)), _member("ok2.txt", b"ok2")))
    batch = next(_stream([str(crafted)], tokenizer, _cfg()))
    assert batch["skipped"] == {"missing_image": 1, "shards": 0}


def test_any_failure_on_one_sample_skips_it_and_is_counted(tmp_path, tokenizer, monkeypatch):
    from megaclip.data import stream as stream_module
    urls = write_shards([_good(i) for i in range(5)], str(tmp_path / "s"))
    crop = stream_module.TrainCrop.__call__
    calls = []

    def failing(self, *args):  # the third sample's view raises something no one expected
        calls.append(1)
        if len(calls) == 3:
            raise ZeroDivisionError("a decoder bug")
        return crop(self, *args)
    monkeypatch.setattr(stream_module.TrainCrop, "__call__", failing)
    it = _stream(urls, tokenizer, _cfg())
    next(it)
    batch = next(it)
    assert batch["skipped"] == {"sample_error": 1, "shards": 0}


def test_only_needed_members_are_read_and_a_sparse_sample_is_skipped(tmp_path, tokenizer):
    """8 unneeded members and an image of 64 MiB each, holes on disk: none is read."""
    path = _sparse_tar(tmp_path / "sparse.tar",
                       [(f"k0.x{j}", 64 * MiB) for j in range(8)] + [("k0.jpg", 64 * MiB),
                                                                       ("k0.txt", 16)])
    assert os.stat(path).st_blocks * 512 < 64 * 1024  # a few KB on disk
    samples = list(read_shard(path, 32 * MiB, keys=frozenset({"jpg", "txt"})))
    assert samples[0]["__unread__"] == [f"x{j}" for j in range(8)]
    assert samples[0]["__oversize__"] == ["jpg"] and "jpg" not in samples[0]
    cfg = _cfg(max_member_bytes=32 * MiB)
    it = TrainStream(cfg, 16, tokenizer, 1, 0, 1, urls=[path])
    batch = next(iter(it))
    assert batch["skipped"] == {"member_too_large": 1, "shards": 0}


def test_the_per_sample_cap_counts_the_needed_members_together(tmp_path):
    path = tmp_path / "two.tar"
    path.write_bytes(_tar(_member("k.jpg", b"a" * 3000), _member("k.png", b"b" * 3000),
                          _member("k.txt", b"t")))
    sample = next(read_shard(str(path), 4000, keys=frozenset({"jpg", "png", "txt"}),
                             max_sample_bytes=4000))
    assert sample["__oversize__"] == ["png"] and sample["__sample_cap__"] == ["png"]
    with pytest.raises(BadSample, match="max_sample_bytes"):
        from megaclip.data.decode import open_image
        open_image(sample, ("png",), 10**6)


# ---------------------------------------------------------------------------- shards
@pytest.mark.parametrize("case", ["pax_bomb", "gzip_named_tar", "long_name", "pax_digits"])
def test_crafted_tar_headers_make_the_shard_bad_before_they_are_read(tmp_path, case):
    path = tmp_path / f"{case}.tar"
    if case == "pax_bomb":  # declares 600 MiB; the file is 1 KB
        path.write_bytes(_pax_bomb(600 * MiB) + b"\0" * 512)
    elif case == "gzip_named_tar":  # a 600 MiB pax header compressed into a few hundred KB
        with gzip.open(path, "wb", compresslevel=1) as f:
            f.write(_pax_bomb(600 * MiB))
            zeros = b"0" * MiB
            for _ in range(8):  # enough to show it is not read: the header alone is refused
                f.write(zeros)
        assert path.stat().st_size < 100 * 1024
    elif case == "long_name":
        path.write_bytes(_header("././@LongLink", 300 * MiB, tarfile.GNUTYPE_LONGNAME)
                         + b"a" * 512)
    else:  # Python's pax parser is quadratic in a run of digits (CVE-2024-6232)
        payload = b"1" * 60000
        path.write_bytes(_tar(_header("././@PaxHeader", len(payload), tarfile.XHDTYPE) + payload
                              + b"\0" * (-len(payload) % 512), _member("k.txt", b"x")))
    started = time.perf_counter()
    with pytest.raises(BadShard, match="extended header|run of 60000 digits"):
        list(read_shard(str(path)))
    assert time.perf_counter() - started < 2


def test_a_small_pax_header_still_reads(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("k." + "x" * 120 + ".txt", b"long name"), ("k2.txt", b"short")):
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), {"comment": "1700000000.123456789"}
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "pax.tar"
    path.write_bytes(buf.getvalue())
    assert [s["__key__"] for s in read_shard(str(path))] == ["k", "k2"]


def test_a_stalled_pipe_shard_is_killed_and_skipped(tmp_path, tokenizer):
    good = write_shards([_good(i) for i in range(4)], str(tmp_path / "g"))[0]
    marker = tmp_path / "still-running"
    # The command and what it started are killed: the background child never writes.
    stalled = f"pipe:(sleep 4; touch {marker}) & sleep 600"
    cfg = _cfg(shard_stall_timeout_s=1.0)
    started = time.perf_counter()
    it = _stream([stalled, good], tokenizer, cfg)
    batch = [next(it) for _ in range(3)][-1]  # the whole first epoch has been read
    assert time.perf_counter() - started < 30
    assert batch["skipped"]["shards"] == 1
    time.sleep(5)
    assert not marker.exists()


# ---------------------------------------------------------------------------- images
def test_every_decoder_path_has_the_pixel_limit_and_formats(tmp_path):
    with pytest.raises(BadSample, match="image_too_large"):
        open_bytes(_huge_png(), DataConfig.max_image_pixels)
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's own limit is never switched off
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    with pytest.raises(BadSample, match="undecodable_image"):
        open_bytes(eps, 10**6)
    # Evaluation: a held-out image over the limit is an error naming it, before decoding.
    shard = write_shards([{"__key__": "huge", "png": _huge_png(), "txt": "a huge", "cls": "0"}],
                         str(tmp_path / "eval"))[0]
    (tmp_path / "classes.json").write_text('{"classnames": ["huge"], "templates": ["a {}"]}')
    data = EvalSet(shard, str(tmp_path / "classes.json"), 32, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(UserError, match="huge.*image_too_large"):
        data.images([0])
    # Dataset making: make_eval_set refuses it (exit 2), make_shards skips it as too large.
    folder = tmp_path / "folder" / "cat"
    folder.mkdir(parents=True)
    (folder / "huge.png").write_bytes(_huge_png())
    proc = run_tool("make_eval_set.py", "--images", str(tmp_path / "folder"), "--out",
                    str(tmp_path / "made"), check=False)
    assert proc.returncode == 2 and "huge.png" in proc.stderr and "image_too_large" in proc.stderr
    (tmp_path / "caps.csv").write_text("image,caption\ncat/huge.png,a cat\n")
    proc = run_tool("make_shards.py", "--images", str(tmp_path / "folder"), "--captions",
                    str(tmp_path / "caps.csv"), "--out", str(tmp_path / "shards"), check=False)
    assert "image_too_large 1" in proc.stdout


# ---------------------------------------------------------------------------- a dead worker
def test_a_worker_that_dies_on_a_shard_has_it_recorded_and_skipped_after(tmp_path, tokenizer):
    good = write_shards([_good(i) for i in range(8)], str(tmp_path / "g"), maxcount=4)
    killer = "pipe:kill -9 $PPID"  # the data worker that reads this shard dies
    deaths = str(tmp_path / "data_worker_deaths.txt")
    cfg = _cfg(workers=1)
    loader = build_train_loader(cfg, 16, tokenizer, 2, 0, 1, urls=[killer, *good],
                                deaths_file=deaths)
    it = iter(loader)
    with pytest.raises(FatalError, match=r"data worker 0 died \(killed by signal 9\) while "
                                         r"reading pipe:kill"):
        for _ in range(10):  # the first epoch (4 batches of good samples) reads it
            next(it)
    loader.close()
    assert open(deaths).read() == killer + "\n"
    loader = build_train_loader(cfg, 16, tokenizer, 2, 0, 1, urls=[killer, *good],
                                deaths_file=deaths)
    batches = [b for _, b in zip(range(10), loader)]
    assert len(batches) == 10 and batches[-1]["skipped"]["shards"] >= 1
    loader.close()


# ---------------------------------------------------------------------------- a training run
@pytest.mark.slow
def test_training_reaches_its_last_step_over_crafted_shards_and_resumes_past_them(
        tmp_path, synthetic):
    """Every crafted shard among good ones; a run stopped right after them resumes past them
    and reaches its last step; the counts say what was skipped."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "oversize.tar").write_bytes(_tar(_member("e.__oversize__", b"jpg"),
                                            _member("e.txt", b"x")))
    _sparse_tar(bad / "sparse.tar", [(f"k0.x{j}", 16 * MiB) for j in range(8)]
                + [("k0.jpg", 16 * MiB), ("k0.txt", 16)])
    (bad / "pax.tar").write_bytes(_pax_bomb(600 * MiB) + b"\0" * 512)
    with gzip.open(bad / "gzip.tar", "wb", compresslevel=1) as f:
        f.write(_pax_bomb(600 * MiB) + b"0" * MiB)
    # 40 good samples in 10 shards: the 6 steps of 8 read a whole epoch, every bad shard too.
    write_shards([_good(i) for i in range(40)], str(tmp_path / "good"), maxcount=4)
    shards = (f"pipe:sleep 600::{bad}/oversize.tar::{bad}/sparse.tar::{bad}/pax.tar::"
              f"{bad}/gzip.tar::{tmp_path}/good/shard-{{000000..000009}}.tar")
    out = tmp_path / "run"
    common = [sys.executable, "megaclip/train.py", "--deepspeed_config",
              "ds_configs/zero3_cpu.json", "--config", "clip_tiny_synthetic",
              *synthetic_overrides(synthetic, out), f"data.train_shards={shards}",
              "data.resampled=false", "data.workers=0", "data.shuffle_buffer=0",
              "data.max_bad_shard_fraction=1", "data.shard_stall_timeout_s=1",
              "data.max_member_bytes=1048576", "train.steps=6", "train.log_every=1",
              "train.micro_batch_size=8", "train.ckpt_every=2", "eval.shards="]
    env = dict(os.environ, MASTER_PORT=str(29500 + os.getpid() % 1000))
    first = subprocess.run([*common, "--stop_after_steps", "1"], capture_output=True,
                           text=True, cwd=ROOT, timeout=600, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = subprocess.run([*common, "--resume", "auto"], capture_output=True, text=True,
                            cwd=ROOT, timeout=600, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    import json
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "train/loss" in line]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    last = rows[-1]
    assert last["train/skipped_shards"] >= 3  # the stalled pipe, the pax bomb, the gzip
    assert last["train/skipped_missing_image"] >= 1 and last["train/skipped_member_too_large"] >= 1
    assert torch.isfinite(torch.tensor([r["train/loss"] for r in rows])).all()
