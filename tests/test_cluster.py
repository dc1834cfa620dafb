"""Slurm variables -> torch.distributed env://, the stop signals, and a requeue that fails."""
import os
import signal
import time

import pytest
import torch

from megaclip.cluster import (StopSignal, WorkerSignals, asks_requeue, ephemeral_ports,
                              first_host, master_port, parse_first_host, requeue, slurm_env,
                              tasks_per_node)
from megaclip.errors import FatalError, UserError


@pytest.mark.parametrize("nodelist,first", [
    ("mcnode[1-2]", "mcnode1"), ("gpu[003-010,012],cpu1", "gpu003"), ("node7", "node7"),
    ("a1,b2", "a1"), ("rack[12,3]", "rack12"), ("gpu[01-02]-ib", "gpu01-ib"),
    ("gpu[01-02]-ib,cpu[1-3]", "gpu01-ib"), ("r[1-2]n[07-08]", "r1n07"), ("x-[5,7]", "x-5")])
def test_first_host_of_a_node_list(nodelist, first):
    assert parse_first_host(nodelist) == first
    assert first_host(nodelist, which=lambda name: None) == first


def test_first_host_asks_scontrol_when_there_is_one(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "n-one\\nn-two\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert first_host("whatever[1-2]") == "n-one"
    fake.write_text("#!/bin/sh\nexit 1\n")  # scontrol fails: the parser answers
    assert first_host("gpu[01-02]-ib") == "gpu01-ib"
    with pytest.raises(ValueError, match="unbalanced"):
        parse_first_host("gpu[01-02")


def test_the_rendezvous_port_is_outside_the_ephemeral_range(tmp_path):
    assert master_port("123456", (32768, 60999)) == 20000 + 123456 % 10000
    for job in ("0", "9999", "10000", "4294967295"):
        assert 20000 <= master_port(job, (32768, 60999)) < 30000
    port = master_port("123456", (15000, 60999))  # a range that covers 20000-29999
    assert 1024 <= port < 15000
    (tmp_path / "range").write_text("40000\t50000\n")
    assert ephemeral_ports(str(tmp_path / "range")) == (40000, 50000)
    assert ephemeral_ports(str(tmp_path / "none")) == (32768, 60999)
    low, high = ephemeral_ports()
    assert not low <= master_port("777") <= high  # this machine's own range


def test_env_from_slurm_variables():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "123456"}
    out = slurm_env(env)
    assert out == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_SIZE": "8",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(master_port("123456"))}
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


@pytest.mark.parametrize("cpus", ["6", None])
def test_srun_gets_the_jobs_cpus_per_task(tmp_path, cpus):
    """Slurm 22.05+ does not pass --cpus-per-task from sbatch to srun: slurm/common.sh does."""
    import subprocess
    from tests.conftest import ROOT
    (tmp_path / "srun").write_text('#!/bin/sh\necho "srun $*"\n')
    (tmp_path / "srun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{tmp_path}:{env['PATH']}", MEGACLIP_ROOT=ROOT, CONFIG="c", DS_CONFIG="d",
               TRAIN_SHARDS="s", TOKENIZER="t")
    if cpus:
        env["SLURM_CPUS_PER_TASK"] = cpus
    proc = subprocess.run(["bash", "-c", "source slurm/common.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("srun "))
    assert (f" -c {cpus} " in line) if cpus else (" -c " not in line), line
