"""Slurm variables -> torch.distributed env://, the stop signals, and a requeue that fails."""
import os
import signal

import pytest

from megaclip.cluster import StopSignal, first_host, requeue, slurm_env, tasks_per_node
from megaclip.errors import FatalError


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
