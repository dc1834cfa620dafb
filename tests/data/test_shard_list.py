"""The shard list is checked against the file system by rank 0 alone and shared: at world size 2
over gloo, rank 1 asks the file system nothing and gets rank 0's list, or rank 0's error
(whatever the error: a rank left waiting would hang)."""
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as tmp

from megaclip.data.shards import ShardError, shard_list
from megaclip.make.writer import write_shards
from tests.conftest import free_port


def _rank(rank, port, pattern, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    stats = []
    real = os.path.isfile
    os.path.isfile = lambda p: stats.append(p) or real(p)
    try:
        try:
            results[rank] = ("ok", shard_list(pattern), len(stats))
        except ShardError as e:
            results[rank] = ("error", str(e), len(stats))
    finally:
        os.path.isfile = real
        dist.destroy_process_group()


def _run(pattern):
    with tmp.Manager() as manager:
        results = manager.dict()
        tmp.spawn(_rank, args=(free_port(), pattern, results), nprocs=2)
        return dict(results)


@pytest.mark.distributed
def test_only_rank_0_stats_the_shards_and_every_rank_gets_its_answer(tmp_path):
    paths = write_shards(({"__key__": f"k{i}", "txt": "x"} for i in range(3)), str(tmp_path),
                         maxcount=1)
    pattern = str(tmp_path / "shard-{000000..000002}.tar")
    results = _run(pattern)
    assert results[0] == ("ok", paths, 3) and results[1] == ("ok", paths, 0)

    nothing = str(tmp_path / "none-{000000..000004}.tar")
    results = _run(nothing)
    assert results[0][0] == results[1][0] == "error" and results[0][1] == results[1][1]
    assert "matches no file" in results[1][1] and results[1][2] == 0

    results = _run(str(tmp_path / "shard-{000000..00000"))  # unbalanced braces
    assert results[0][0] == results[1][0] == "error" and results[1][2] == 0
