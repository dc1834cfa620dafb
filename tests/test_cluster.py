"""Slurm variables -> torch.distributed env://, the stop signals, and a requeue that fails."""
import os
import signal
import time

import pytest
import torch

from megaclip.cluster import (StopSignal, WorkerSignals, asks_requeue, first_host, requeue,
                              slurm_env, tasks_per_node)
from megaclip.errors import FatalError, UserError


@pytest.mark.parametrize("nodelist,first", [
    ("mcnode[1-2]", "mcnode1"), ("gpu[003-010,012],cpu1", "gpu003"), ("node7", "node7"),
    ("a1,b2", "a1"), ("rack[12,3]", "rack12")])
def test_first_host_of_a_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_env_from_slurm_variables():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "123456"}
    out = slurm_env(env)
    assert out == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_SIZE": "8",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(10000 + 123456 % 50000)}
    assert slurm_env({**env, "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"
    assert tasks_per_node("2,1") == 2


def test_stop_signal_is_remembered():
    before = signal.getsignal(signal.SIGUSR1)
    try:
        stop = StopSignal(("SIGUSR1",))
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == "SIGUSR1"
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_a_failed_requeue_is_an_error_with_scontrols_message(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho 'slurm_requeue error: Access/permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with pytest.raises(FatalError, match=r"scontrol requeue 4242 failed \(exit 1\): "
                                         r"slurm_requeue error: Access/permission denied"):
        requeue()
    fake.write_text("#!/bin/sh\nexit 0\n")
    assert requeue() == "job 4242 requeued"


def test_sigterm_and_sigusr1_stop_by_default():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = StopSignal()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGTERM"
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_an_unknown_stop_signal_is_a_user_error():
    with pytest.raises(UserError, match="unknown signal 'SIGFOO'"):
        StopSignal(("SIGFOO",))
    with pytest.raises(UserError, match="unknown signal 'SIG_IGN'"):
        StopSignal(("SIG_IGN",))
    with pytest.raises(UserError, match="SIGKILL cannot be caught"):
        StopSignal(("SIGKILL",))


def test_only_requeue_signals_ask_for_a_requeue_whichever_ranks_received_them():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = StopSignal()
        assert stop.flags(("SIGUSR1",)) == (0.0, 0.0)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.flags(("SIGUSR1",)) == (1.0, 0.0) and stop.flags(()) == (0.0, 1.0)
        os.kill(os.getpid(), signal.SIGTERM)  # scancel after the time-limit warning
        assert stop.flags(("SIGUSR1",)) == (1.0, 1.0)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    # Summed over ranks: the warning reached rank 1 alone -> requeue; any SIGTERM -> do not.
    assert asks_requeue(1.0, 0.0) and asks_requeue(2.0, 0.0)
    assert not asks_requeue(1.0, 1.0) and not asks_requeue(0.0, 2.0) and not asks_requeue(0, 0)


class _Forever(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield torch.tensor(os.getpid())


def test_data_workers_outlive_a_stop_signal_until_the_loader_closes():
    """torch makes a worker die of a SIGTERM its parent did not send (Slurm's, sent to every
    process of the job); with WorkerSignals it goes on, and leaves once closing is set."""
    import multiprocessing as mp
    closing = mp.Value("b", 0, lock=False)
    loader = torch.utils.data.DataLoader(_Forever(), batch_size=None, num_workers=1,
                                         worker_init_fn=WorkerSignals(("SIGTERM",), closing),
                                         timeout=60)
    it = iter(loader)
    pid = int(next(it))
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    for _ in range(5):
        assert int(next(it)) == pid  # still there, still delivering
    closing.value = 1
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 30
    while it._workers[0].is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert not it._workers[0].is_alive()
    it._shutdown_workers()
