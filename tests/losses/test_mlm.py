"""The MLM term is the mean over every masked piece of the global batch: at world size 2, with
ranks that mask different numbers of pieces, the mean over ranks of the terms and of their
gradients equals one process over the whole batch (two gloo processes)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megaclip.data.masks import mlm_indices
from megaclip.losses.mlm import MlmLoss
from tests.conftest import free_port

V, L = 11, 6  # vocabulary, caption length


def _data():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (4, L), generator=g)
    target = torch.zeros(4, L, dtype=torch.bool)
    target[0, :1] = True  # rank 0's captions: 1 + 2 pieces; rank 1's: 5 + 4
    target[1, :2] = True
    target[2, :5] = True
    target[3, 1:5] = True
    logits = torch.randn(int(target.sum()), V, generator=g)
    return tokens, target, logits


def _run(rows):
    tokens, target, logits = _data()
    first = int(target[:rows.start].sum())
    n = int(target[rows].sum())
    mine = logits[first:first + n].clone().requires_grad_(True)
    index, valid = mlm_indices(target[rows])
    # The decoder's (B, K, V) output: the chosen pieces in row-major order, and padding rows
    # (large values) that must not count.
    padding = torch.full((*index.shape, V), 50.0)
    padded = padding.index_put(valid.nonzero(as_tuple=True), mine)
    loss = MlmLoss()(padded, tokens[rows], index, valid)["mlm"]
    loss.backward()
    return loss.detach(), mine.grad


def _worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    loss, grad = _run(slice(2 * rank, 2 * rank + 2))
    dist.all_reduce(loss)
    # What data parallelism does: the mean over ranks. Sent as numpy arrays (pickled by value):
    # a tensor would travel as a shared-memory handle that dies with this process.
    queue.put((rank, (loss / 2).numpy(), (grad / 2).numpy()))
    dist.destroy_process_group()


def test_indices_list_the_chosen_positions_then_padding():
    _, target, _ = _data()
    index, valid = mlm_indices(target)
    assert index.shape == valid.shape == (4, 5)
    assert index[0].tolist() == [0, 0, 0, 0, 0] and valid[0].tolist() == [True] + [False] * 4
    assert index[3].tolist() == [1, 2, 3, 4, 0] and valid[3].sum() == 4
    assert index[2].tolist() == [0, 1, 2, 3, 4] and valid[2].all()


def test_one_process_is_the_mean_over_every_chosen_piece():
    tokens, target, logits = _data()
    loss, _ = _run(slice(0, 4))
    want = torch.nn.functional.cross_entropy(logits, tokens[target])
    torch.testing.assert_close(loss, want)


@pytest.mark.distributed
def test_world_size_2_equals_the_mean_over_every_piece():
    loss1, grad1 = _run(slice(0, 4))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (torch.from_numpy(loss), torch.from_numpy(grad)))
                   for r, loss, grad in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    torch.testing.assert_close(results[0][0], loss1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), grad1,
                               rtol=1e-6, atol=1e-7)
