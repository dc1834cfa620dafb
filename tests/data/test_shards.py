"""Reading one shard strictly: every way a shard can be damaged is a BadShard naming it, the
samples before the damage still come out, pipes are closed and their exit status checked."""
import io
import os
import subprocess
import tarfile
import time

import pytest

from megaclip.data.shards import BadShard, ShardError, iter_shard, read_shard
from megaclip.make.writer import write_shards


def _samples(n):
    return [{"__key__": f"s{i:03d}", "jpg": os.urandom(3000), "txt": f"caption {i}"}
            for i in range(n)]


@pytest.fixture
def shard(tmp_path):
    path = write_shards(_samples(10), str(tmp_path / "good"), maxcount=100)[0]
    with tarfile.open(path) as t:
        # Where each member's header and data begin; two members (jpg, txt) per sample.
        offsets = [(m.offset, m.offset_data) for m in t.getmembers()]
    with open(path, "rb") as f:
        return path, f.read(), offsets


def _read(url, **kw):
    keys = []
    try:
        for s in read_shard(url, **kw):
            keys.append(s["__key__"])
    except BadShard as e:
        assert e.url == url
        return keys, e.reason
    return keys, None


def _write(tmp_path, name, data):
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_a_whole_shard_reads_every_sample_and_skip_passes_over_some(shard):
    path, _, _ = shard
    assert _read(path) == ([f"s{i:03d}" for i in range(10)], None)
    assert _read(path, skip=7) == (["s007", "s008", "s009"], None)


def test_truncated_inside_a_member(tmp_path, shard):
    _, data, offsets = shard
    cut = _write(tmp_path, "cut.tar", data[:offsets[6][1] + 100])  # inside s003's jpg
    keys, reason = _read(cut)
    assert keys == ["s000", "s001", "s002"] and "unexpected end of data" in reason


def test_truncated_inside_a_header_is_not_taken_for_the_end(tmp_path, shard):
    _, data, offsets = shard
    cut = _write(tmp_path, "cut.tar", data[:offsets[6][0] + 200])
    keys, reason = _read(cut)
    assert keys == ["s000", "s001"] and "truncated inside a header" in reason


def test_cut_between_members_lacks_the_end_of_archive(tmp_path, shard):
    _, data, offsets = shard
    keys, reason = _read(_write(tmp_path, "cut.tar", data[:offsets[6][0]]))
    assert keys == ["s000", "s001"] and "no end-of-archive marker" in reason


def test_corrupt_header(tmp_path, shard):
    _, data, offsets = shard
    broken = bytearray(data)
    broken[offsets[4][0] + 100: offsets[4][0] + 108] = b"XXXXXXXX"
    keys, reason = _read(_write(tmp_path, "corrupt.tar", bytes(broken)))
    assert keys == ["s000"] and "corrupt header" in reason


def test_duplicate_members(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name in ("a.jpg", "a.txt", "a.txt", "b.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 3
            t.addfile(info, io.BytesIO(b"abc"))
    keys, reason = _read(_write(tmp_path, "dup.tar", buf.getvalue()))
    assert keys == [] and "duplicate member a.txt" in reason


def test_missing_file(tmp_path):
    assert _read(str(tmp_path / "gone.tar")) == ([], "file does not exist")


def test_pipe_failing_after_all_its_output(shard):
    path, _, _ = shard
    keys, reason = _read(f"pipe:cat {path}; exit 3")
    assert keys == [f"s{i:03d}" for i in range(10)] and reason == "command exited with status 3"


def test_pipe_failing_part_way_gives_the_same_samples_every_time(tmp_path, shard):
    """Its output is read to the end before its status: what came out is what a file cut at
    the same byte gives, on every read (a resumed stream depends on it)."""
    path, data, _ = shard
    cut = _write(tmp_path, "cut.tar", data[:len(data) // 2])
    url = f"pipe:head -c {len(data) // 2} {path}; exit 4"
    expected = _read(cut)[0]
    assert len(expected) >= 3
    for _ in range(5):
        assert _read(url) == (expected, "command exited with status 4")


def test_a_command_cut_off_after_the_archive_is_not_a_failure(tmp_path, shard):
    path, _, _ = shard
    padded = _write(tmp_path, "padded.tar", open(path, "rb").read() + b"\0" * (4 << 20))
    assert _read(f"pipe:exec cat {padded}") == ([f"s{i:03d}" for i in range(10)], None)


def test_pipe_that_succeeds_is_waited_for(shard):
    path, _, _ = shard
    assert _read(f"pipe:cat {path}") == ([f"s{i:03d}" for i in range(10)], None)


def test_an_abandoned_pipe_is_killed_with_what_it_started(tmp_path, shard):
    path, _, _ = shard
    pid_file = tmp_path / "pid"  # the pid of a child of the shell, not of the shell
    it = read_shard(f"pipe:sleep 30 & echo $! > {pid_file}; cat {path}; wait")
    next(it)
    it.close()
    pid = int(pid_file.read_text())
    deadline = time.time() + 5
    while time.time() < deadline:
        state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                               text=True).stdout.strip()
        if not state or state.startswith("Z"):
            break
        time.sleep(0.05)
    assert not state or state.startswith("Z"), f"pipe command still running ({state})"


def test_members_over_the_cap_are_not_read(shard):
    path, _, _ = shard
    samples = list(read_shard(path, max_member_bytes=1000))
    assert all(s["__oversize__"] == ["jpg"] and "jpg" not in s and s["txt"] for s in samples)


def test_iter_shard_turns_a_bad_shard_into_an_error_naming_it(tmp_path):
    with pytest.raises(ShardError, match=r"cannot read shard .*gone.tar: file does not exist"):
        list(iter_shard(str(tmp_path / "gone.tar")))
