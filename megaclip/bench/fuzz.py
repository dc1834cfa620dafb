"""Mutation fuzzing of the shard reader and the sample decoder: random damage to valid shards
(bit flips, header fields overwritten with digits or huge sizes, extended headers spliced in,
blocks duplicated or cut, gzip around it), each read the way training reads it. Every input must
end as samples, skipped samples or a bad shard: any other exception is a crash. Runs in one
process under an address-space limit; reports inputs tried, outcomes, crashes, the slowest
input and the peak memory."""
from __future__ import annotations

import gzip
import io
import random
import resource
import tarfile
import tempfile
import time
import traceback

from PIL import Image

from megaclip.data.decode import BadSample, decode_caption, load_image, open_image
from megaclip.data.shards import BadShard, read_shard

KEYS = frozenset({"jpg", "png", "webp", "txt"})
IMAGE_KEYS = ("jpg", "png", "webp")


def _image(fmt: str, side: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (seed % 255, 40, 200)).save(buf, format=fmt)
    return buf.getvalue()


def seed_shards() -> list[bytes]:
    """Valid shards in the formats the reader meets: ustar, GNU and pax tars, with JPEG, PNG
    and WebP members, long names, extra members, and a gzip-compressed one."""
    out = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for i, (ext, kind) in enumerate((("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"))):
                long = i == 2 and fmt != tarfile.USTAR_FORMAT  # ustar has no long names
                key = f"sample{i:03d}" + ("_" + "x" * 110 if long else "")
                for name, data in ((f"{key}.{ext}", _image(kind, 16 + 8 * i, i)),
                                   (f"{key}.txt", f"caption {i}".encode()),
                                   (f"{key}.json", b'{"a": 1}')):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    if fmt == tarfile.PAX_FORMAT:
                        info.pax_headers = {"comment": "1700000000.123"}
                    tar.addfile(info, io.BytesIO(data))
        out.append(buf.getvalue())
    out.append(gzip.compress(out[0]))
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random damages."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        if not b:
            break
        at = rng.randrange(len(b))
        if op == 0:  # bit flips
            for _ in range(rng.randint(1, 16)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # a header's size field: digits, huge, or garbage
            block = (at // 512) * 512
            field = rng.choice([b"77777777777", b"%011o" % rng.randrange(1 << 33),
                                bytes(rng.randrange(256) for _ in range(11))])
            b[block + 124: block + 135] = field
        elif op == 2:  # a header's type flag: pax, GNU long name, sparse, link...
            block = (at // 512) * 512
            if block + 156 < len(b):
                b[block + 156] = ord(rng.choice("xgLKS1257"))
        elif op == 3:  # cut
            del b[at:]
        elif op == 4:  # duplicate a stretch of blocks
            start = (at // 512) * 512
            b[start:start] = b[start: start + 512 * rng.randint(1, 4)]
        elif op == 5:  # a run of digits (pax parsing)
            b[at:at] = b"1" * rng.choice([10, 300, 5000, 60000])
        elif op == 6:  # random bytes
            b[at: at + 64] = bytes(rng.randrange(256) for _ in range(64))
        else:  # zero a stretch
            b[at: at + rng.randint(1, 2048)] = bytes(min(2048, len(b) - at))
    return bytes(b)


def _write_seed(data: bytes) -> str:
    f = tempfile.NamedTemporaryFile(suffix=".tar", delete=False)
    f.write(data)
    f.close()
    return f.name


def read_like_training(path: str, max_pixels: int) -> dict:
    """Read a shard as training does (needed members only, caps on), decode every sample."""
    counts = {"samples": 0, "bad_samples": 0, "bad_shard": 0}
    try:
        for sample in read_shard(path, 1 << 20, keys=KEYS, max_sample_bytes=2 << 20):
            try:
                decode_caption(sample, "txt", 1 << 16)
                load_image(open_image(sample, IMAGE_KEYS, max_pixels))
                counts["samples"] += 1
            except BadSample:
                counts["bad_samples"] += 1
    except BadShard:
        counts["bad_shard"] = 1
    return counts


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def run(seconds: float, seed: int = 0, memory_cap_gib: float = 2.0,
        max_pixels: int = 89_478_485) -> dict:
    """Fuzz for ``seconds`` with at most ``memory_cap_gib`` more address space than the process
    had at the start (a read that needs more fails with MemoryError, which counts as a crash)."""
    rng = random.Random(seed)
    seeds = seed_shards()
    read_like_training(_write_seed(seeds[0]), max_pixels)  # every decoder loaded before the cap
    start_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cap = _address_space() + int(memory_cap_gib * 2**30)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    totals = {"inputs": 0, "samples": 0, "bad_samples": 0, "bad_shards": 0, "crashes": 0}
    crashes, slowest = [], (0.0, -1)
    end = time.monotonic() + seconds
    try:
        with tempfile.NamedTemporaryFile(suffix=".tar") as f:
            while time.monotonic() < end:
                data = mutate(rng.choice(seeds), rng)
                f.seek(0)
                f.truncate()
                f.write(data)
                f.flush()
                started = time.perf_counter()
                try:
                    got = read_like_training(f.name, max_pixels)
                except Exception:  # noqa: BLE001 - what the fuzzer is looking for
                    totals["crashes"] += 1
                    if len(crashes) < 5:
                        crashes.append(traceback.format_exc(limit=4))
                    got = {}
                took = time.perf_counter() - started
                slowest = max(slowest, (took, totals["inputs"]))
                totals["inputs"] += 1
                totals["samples"] += got.get("samples", 0)
                totals["bad_samples"] += got.get("bad_samples", 0)
                totals["bad_shards"] += got.get("bad_shard", 0)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {**totals, "seconds": seconds, "seed": seed, "slowest_input_s": slowest[0],
            "peak_rss_mib": peak_mib, "start_rss_mib": start_rss_mib,
            "memory_cap_gib": memory_cap_gib,
            "first_crashes": crashes}
