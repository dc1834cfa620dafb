"""A real two-node Slurm cluster on this machine, for the tests of the sbatch scripts.

munge, one slurmctld on the host, and one slurmd per node; each node is a network namespace with
its own host name and address (10.77.0.11, 10.77.0.12) behind a bridge on the host (10.77.0.1),
the names in /etc/hosts. Needs root and Debian's slurmctld, slurmd, slurm-client and munge
(``.ci/run`` installs them). Everything started is torn down on exit: daemons by process id,
then namespaces, links and the /etc/hosts lines.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BRIDGE, HOST_ADDR, PREFIX = "mcbr0", "10.77.0.1", "10.77.0"
NODES = {"mcnode1": "10.77.0.11", "mcnode2": "10.77.0.12"}
HOSTS_TAG = "# megaclip-test-cluster"
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged", "ip", "nsenter",
            "unshare")


def missing_requirements() -> list[str]:
    out = [b for b in BINARIES if shutil.which(b) is None]
    if os.geteuid() != 0:
        out.append("root")
    return out


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class SlurmCluster:
    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.conf = self.dir / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.pids: list[int] = []
        self.started_munge = False
        self.controller = socket.gethostname().split(".")[0]

    # ---------------------------------------------------------------------------- setup
    def __enter__(self) -> "SlurmCluster":
        try:
            self._teardown_network()  # leftovers of an interrupted run
            self._munge()
            self._network()
            self._write_conf()
            self._start_daemons()
            self._wait_idle()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _munge(self) -> None:
        if sh("pgrep", "-x", "munged", check=False).returncode == 0:
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            sh("mungekey", "--create", "--force") if shutil.which("mungekey") else \
                key.write_bytes(os.urandom(1024))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        sh("runuser", "-u", "munge", "--", "munged") if shutil.which("runuser") else \
            sh("munged", "--force")
        self.started_munge = True

    def _network(self) -> None:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{HOST_ADDR}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        hosts = [f"{HOST_ADDR} {self.controller}-mc {HOSTS_TAG}"]
        for i, (name, addr) in enumerate(NODES.items(), 1):
            ns, host_if, node_if = f"mcn{i}", f"mcv{i}h", f"mcv{i}n"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", node_if)
            sh("ip", "link", "set", host_if, "master", BRIDGE)
            sh("ip", "link", "set", host_if, "up")
            sh("ip", "link", "set", node_if, "netns", ns)
            for cmd in (["ip", "addr", "add", f"{addr}/24", "dev", node_if],
                        ["ip", "link", "set", node_if, "up"], ["ip", "link", "set", "lo", "up"]):
                sh("nsenter", f"--net=/run/netns/{ns}", *cmd)
            hosts.append(f"{addr} {name} {HOSTS_TAG}")
        with open("/etc/hosts", "a") as f:
            f.write("\n".join(hosts) + "\n")

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        d = self.dir
        nodes = "\n".join(f"NodeName={n} NodeAddr={a} CPUs=1 RealMemory=4000 State=UNKNOWN"
                          for n, a in NODES.items())
        self.conf.write_text(f"""ClusterName=megaclip-test
SlurmctldHost={self.controller}({HOST_ADDR})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
MessageTimeout=30
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _start_daemons(self) -> None:
        sh("slurmctld", "-i", env=self.env)  # forks; pid file holds its id
        self._wait_file(self.dir / "slurmctld.pid")
        self.pids.append(int((self.dir / "slurmctld.pid").read_text()))
        for i, name in enumerate(NODES, 1):
            sh("nsenter", f"--net=/run/netns/mcn{i}", "unshare", "--uts", "sh", "-c",
               f"hostname {name}; exec slurmd -N {name}", env=self.env)
            pid_file = self.dir / f"slurmd-{name}.pid"
            self._wait_file(pid_file)
            self.pids.append(int(pid_file.read_text()))

    @staticmethod
    def _wait_file(path: Path, timeout: float = 30) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if path.exists() and path.read_text().strip():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{path} did not appear")

    def _wait_idle(self, timeout: float = 60) -> None:
        end = time.time() + timeout
        while time.time() < end:
            out = sh("sinfo", "-h", "-N", "-o", "%N %t", env=self.env, check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if len(states) == len(NODES) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle: {out!r}\n{self.logs()}")

    # ---------------------------------------------------------------------------- use
    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        """A client command (sbatch, squeue, scontrol, scancel) against this cluster."""
        return sh(*cmd, env={**self.env, **kw.pop("env", {})}, **kw)

    def job_state(self, job: str) -> str:
        out = self.run("scontrol", "show", "job", job, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def logs(self) -> str:
        parts = []
        for f in sorted((self.dir / "log").glob("*.log")):
            parts.append(f"== {f.name}\n" + "\n".join(f.read_text().splitlines()[-30:]))
        return "\n".join(parts)

    # ---------------------------------------------------------------------------- teardown
    def __exit__(self, *exc) -> None:
        if self.pids:
            sh("scancel", "--full", "--quiet", "-p", "test", env=self.env, check=False)
            time.sleep(1)
        for pid in reversed(self.pids):
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        end = time.time() + 15
        for pid in self.pids:
            while time.time() < end and os.path.exists(f"/proc/{pid}"):
                time.sleep(0.2)
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, 9)
        self.pids = []
        if self.started_munge:
            sh("pkill", "-x", "munged", check=False)
        self._teardown_network()

    @staticmethod
    def _teardown_network() -> None:
        for i in range(1, len(NODES) + 1):
            sh("ip", "netns", "del", f"mcn{i}", check=False)
            sh("ip", "link", "del", f"mcv{i}h", check=False)
        sh("ip", "link", "del", BRIDGE, check=False)
        try:
            lines = Path("/etc/hosts").read_text().splitlines()
            kept = [ln for ln in lines if HOSTS_TAG not in ln]
            if len(kept) != len(lines):
                Path("/etc/hosts").write_text("\n".join(kept) + "\n")
        except OSError:
            pass
