"""SILC's local-to-global loss: the cross-entropy of DINO over (teacher global view, other student
view) pairs, and its centre, updated once per optimiser step over every rank."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megaclip.config import LocalGlobalConfig
from megaclip.losses.local_global import LocalGlobalLoss
from tests.conftest import free_port

G, L, B, K = 2, 3, 4, 16


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(G + L, B, K, generator=g), torch.randn(G, B, K, generator=g) * 3


def _cfg(**kw):
    return LocalGlobalConfig(prototypes=K, teacher_temp=0.05, teacher_temp_warmup=0.05, **kw)


def test_loss_is_the_mean_over_pairs_of_different_views():
    student, teacher = _inputs(0)
    cfg = _cfg()
    terms, stats = LocalGlobalLoss(cfg, 100)(student, teacher, step=0)
    pairs = []
    for t in range(G):
        q = torch.softmax(teacher[t] / cfg.teacher_temp, -1)  # the centre is zero at first
        for s in range(G + L):
            if s != t:
                log_p = torch.log_softmax(student[s] / cfg.student_temp, -1)
                pairs.append(-(q * log_p).sum(-1).mean())
    assert len(pairs) == G * (G + L) - G
    torch.testing.assert_close(terms["local_global"], torch.stack(pairs).mean())
    assert 0 < stats["global_teacher_entropy"] < math.log(K)
    assert stats["global_teacher_batch_entropy"] >= stats["global_teacher_entropy"] - 1e-6


def test_a_global_view_is_never_distilled_into_itself():
    """The student's copy of global view t receives no gradient from teacher view t: changing
    that teacher view leaves its gradient as it was, and changes the others'."""
    student, teacher = _inputs(1)

    def grad(teacher_views):
        s = student.clone().requires_grad_(True)
        LocalGlobalLoss(_cfg(), 100)(s, teacher_views, 0)[0]["local_global"].backward()
        return s.grad

    changed = teacher.clone()
    changed[0] = torch.randn(B, K)
    before, after = grad(teacher), grad(changed)
    assert torch.equal(before[0], after[0])  # student view 0 only learns from teacher view 1
    assert not torch.allclose(before[1], after[1])  # student view 1 learns from teacher view 0
    assert all(not torch.allclose(before[s], after[s]) for s in range(G, G + L))


def test_gradient_reaches_the_student_only():
    student, teacher = _inputs(2)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    LocalGlobalLoss(_cfg(), 100)(student, teacher, 0)[0]["local_global"].backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


def test_centre_moves_once_per_optimiser_step_and_not_on_a_skipped_one():
    """Under gradient accumulation 2 the two micro-batches enter one update (momentum 0.9 per
    optimiser step, not 0.9^2)."""
    student, teacher = _inputs(3)
    other = teacher.flip(1) * 2
    loss = LocalGlobalLoss(_cfg(center_momentum=0.9), 100)
    loss(student, teacher, 0)
    assert torch.equal(loss.centering.center, torch.zeros(K))  # not per micro-batch
    loss(student, other, 0)
    loss.end_step(applied=True)
    step_mean = torch.cat([teacher, other], 1).mean(dim=(0, 1))
    torch.testing.assert_close(loss.centering.center, 0.1 * step_mean)
    loss(student, teacher, 1)
    loss.end_step(applied=False)
    torch.testing.assert_close(loss.centering.center, 0.1 * step_mean)


def _centre_after_two_steps(rows, world):
    """The centre after two optimiser steps of two micro-batches each, this rank's rows."""
    loss = LocalGlobalLoss(_cfg(center_momentum=0.8), 100)
    student = torch.zeros(G + L, B, K)
    for step in range(2):
        for micro in range(2):
            _, teacher = _inputs(10 * step + micro)
            loss(student[:, rows], teacher[:, rows], step)
        loss.end_step(applied=True)
    return loss.centering.center


def _worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rows = slice(rank * B // 2, (rank + 1) * B // 2)
    queue.put((rank, _centre_after_two_steps(rows, 2).numpy()))  # numpy: pickled by value
    dist.destroy_process_group()


@pytest.mark.distributed
def test_centre_at_world_size_2_equals_one_process():
    one = _centre_after_two_steps(slice(0, B), 1)
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for r in range(2):
        torch.testing.assert_close(torch.from_numpy(got[r]), one, rtol=1e-6, atol=1e-7)
    assert one.abs().sum() > 0
