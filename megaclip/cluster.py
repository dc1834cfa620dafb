"""Running under Slurm: torch.distributed env:// variables from Slurm's, pre-emption signals,
and requeueing the job once a checkpoint is safe.

``srun`` starts one task per GPU; every task computes its rank, local rank and world size from
``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS``, and the rendezvous address from the first host
of the allocation. No ssh, no pdsh, no launcher process.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from typing import Optional

from megaclip.errors import FatalError, UserError

def parse_first_host(nodelist: str) -> str:
    """The first host of a Slurm node list, without scontrol: ``gpu[003-010,012],cpu1`` ->
    ``gpu003``, ``gpu[01-02]-ib`` -> ``gpu01-ib``, ``r[1-2]n[07-08]`` -> ``r1n07``."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty node list")
    out, depth, body = [], 0, ""
    for ch in nodelist:
        if ch == "[":
            depth, body = depth + 1, ""
        elif ch == "]":
            depth -= 1
            out.append(re.split(r"[,-]", body)[0])  # the first value of the first range
        elif depth:
            body += ch
        elif ch == ",":
            break  # the end of the first host expression
        else:
            out.append(ch)
    if depth:
        raise ValueError(f"unbalanced brackets in node list {nodelist!r}")
    return "".join(out)


def first_host(nodelist: str, which=shutil.which) -> str:
    """The first host name of a Slurm node list, as ``scontrol show hostnames`` expands it when
    scontrol is on PATH; ``parse_first_host`` otherwise, or when scontrol fails."""
    if which("scontrol") is not None:
        try:
            proc = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                                  capture_output=True, text=True, timeout=60)
            names = proc.stdout.split()
            if proc.returncode == 0 and names:
                return names[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return parse_first_host(nodelist)


def ephemeral_ports(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The range the kernel hands out to outgoing connections (Linux's default 32768-60999)."""
    try:
        with open(path) as f:
            low, high = (int(x) for x in f.read().split()[:2])
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def master_port(job_id: str, ephemeral: Optional[tuple[int, int]] = None) -> int:
    """A port every task of the job derives alike and the kernel never hands out to an outgoing
    connection (a clash there fails the rendezvous at random): 20000 + job_id % 10000 when that
    window is outside the ephemeral range, else in the widest gap beside it. MASTER_PORT wins."""
    low, high = ephemeral or ephemeral_ports()
    window = (20000, 29999)
    if window[1] < low or window[0] > high:
        return window[0] + int(job_id) % 10000
    gaps = [(1024, low - 1), (high + 1, 65535)]
    start, end = max(gaps, key=lambda g: g[1] - g[0])
    if end < start:
        raise UserError(f"the ephemeral port range {low}-{high} leaves no port for the "
                        f"rendezvous: set MASTER_PORT")
    return start + int(job_id) % min(10000, end - start + 1)


def tasks_per_node(value: str) -> int:
    """``SLURM_TASKS_PER_NODE`` such as ``8(x4)`` or ``2,1``: the first node's count."""
    return int(value.split(",")[0].split("(")[0])


def slurm_env(environ: Optional[dict] = None) -> dict[str, str]:
    """The env:// variables torch.distributed needs, from a Slurm task's environment.
    Values already set (MASTER_ADDR, MASTER_PORT) win."""
    env = os.environ if environ is None else environ
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
           "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
           "LOCAL_SIZE": str(tasks_per_node(env.get("SLURM_TASKS_PER_NODE", "1"))),
           "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"]),
           "MASTER_PORT": env.get("MASTER_PORT") or str(master_port(env["SLURM_JOB_ID"]))}
    return out


def in_slurm_step() -> bool:
    """True inside an ``srun`` task (not in the batch shell, not under another launcher)."""
    return "SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ and \
        "RANK" not in os.environ


def setup_from_slurm() -> bool:
    """Fill the env:// variables when running as an srun task; returns whether it did."""
    if not in_slurm_step():
        return False
    os.environ.update(slurm_env())
    return True


def host_description() -> str:
    name = socket.gethostname()
    try:
        addr = socket.gethostbyname(name)
    except OSError:
        addr = "?"
    return f"{name} ({addr})"


def signal_numbers(names) -> list[int]:
    """Signal names (``SIGTERM``) as numbers; an unknown name is a ``UserError``."""
    out = []
    for name in names:
        sig = getattr(signal, str(name), None)
        if not str(name).startswith("SIG") or not isinstance(sig, signal.Signals):
            raise UserError(f"unknown signal {name!r}; e.g. SIGTERM, SIGUSR1, SIGUSR2, SIGINT")
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise UserError(f"{name} cannot be caught: it cannot be a stop signal")
        out.append(sig)
    return out


class StopSignal:
    """Remembers that one of ``signals`` arrived (e.g. Slurm's warning before the time limit, or
    ``scancel --signal=USR1``); the trainer checks it at step boundaries."""

    def __init__(self, names: tuple = ("SIGTERM", "SIGUSR1")):
        self.received: Optional[str] = None  # the latest
        self.seen: set[str] = set()
        for sig in signal_numbers(names):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        self.seen.add(self.received)

    def flags(self, requeue_signals) -> tuple[float, float]:
        """(a requeue signal arrived, another stop signal arrived), as this rank saw them; summed
        over the ranks they decide the stop and the requeue (``asks_requeue``)."""
        return (float(bool(self.seen & set(requeue_signals))),
                float(bool(self.seen - set(requeue_signals))))


def asks_requeue(requeue_ranks: float, other_ranks: float) -> bool:
    """Requeue when a requeue signal reached some rank and no other stop signal reached any (a
    SIGTERM from scancel as well means: do not)."""
    return requeue_ranks > 0 and other_ranks == 0


class WorkerSignals:
    """A data-loader worker's ``worker_init_fn``: the stop signals do not kill it.

    Slurm sends pre-emption's and ``scancel``'s SIGTERM to every process of the job, data-loader
    workers included, and torch makes a worker die of a SIGTERM that its parent did not send; the
    main process would then fail on its next batch instead of checkpointing. A worker ignores the
    stop signals until its main process sets ``closing`` (``TrainLoader.close``, or at exit),
    then leaves on them, as torch's shutdown expects."""

    def __init__(self, names: tuple, closing):
        self.numbers, self.closing = signal_numbers(names), closing

    def __call__(self, worker_id: int) -> None:
        for sig in self.numbers:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.closing.value:
            os._exit(0)


def requeue() -> str:
    """Ask Slurm to requeue this job (it restarts with the same id and resumes). A failed
    requeue is a ``FatalError``: the job must not end as if it had finished."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not a Slurm job: not requeued"
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FatalError(f"scontrol requeue {job} failed: {e}; the checkpoint is saved, "
                         f"resume with --resume auto") from None
    if proc.returncode != 0:
        raise FatalError(f"scontrol requeue {job} failed (exit {proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()}; the checkpoint is saved, "
                         f"resume with --resume auto")
    return f"job {job} requeued"
