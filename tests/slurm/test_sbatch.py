"""The real sbatch scripts on a real two-node Slurm cluster (tests/slurm/cluster.py): ranks on
both nodes join one ZeRO-3 job over the two addresses; a USR1 signal makes the job checkpoint,
requeue itself and resume at the step where it stopped."""
import os
import re
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.slurm.cluster import NODES, SlurmCluster, missing_requirements

STEPS = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_requirements()
    if missing:
        msg = f"a Slurm cluster needs {', '.join(missing)} (.ci/run installs the packages)"
        if os.environ.get("MEGACLIP_REQUIRE_SLURM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def _wait_for(path, pattern, timeout, cluster, job):
    end = time.time() + timeout
    text = ""
    while time.time() < end:
        text = path.read_text() if path.exists() else ""
        m = re.search(pattern, text, re.M)
        if m:
            return m, text
        if cluster.job_state(job) in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "COMPLETED"):
            break
        time.sleep(1)
    raise AssertionError(f"'{pattern}' not seen; job state "
                         f"{cluster.job_state(job)}\n{text[-4000:]}\n{cluster.logs()}")


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_job_is_preempted_requeued_and_resumes(cluster, synthetic, tmp_path):
    out = tmp_path / "run"
    env = {"MEGACLIP_ROOT": ROOT, "PYTHON": sys.executable, "CONFIG": "clip_tiny_synthetic",
           "DS_CONFIG": "ds_configs/zero3_cpu.json",
           "TRAIN_SHARDS": str(synthetic / "train" / "shard-{000000..000003}.tar"),
           "TOKENIZER": str(synthetic / "spm.model"), "OUTPUT_DIR": str(out),
           "EXTRA_ARGS": f"train.steps={STEPS} train.log_every=1 train.ckpt_every=1000 "
                         "train.micro_batch_size=8 data.workers=1 data.shuffle_buffer=30 "
                         "eval.shards= train.tensorboard=false"}
    # The script's own resources, scaled to this CPU cluster: 2 nodes x 1 task, no GPUs.
    submit = cluster.run("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1",
                         "--gpus-per-node=0", "--cpus-per-task=1", "--time=20",
                         f"--output={tmp_path}/%x-%j.log", "slurm/pretrain_vitb.sh",
                         cwd=ROOT, env=env)
    job = submit.stdout.strip().split(";")[0]
    log = tmp_path / f"megaclip-vitb16-{job}.log"

    # 1. Both nodes' ranks joined one ZeRO-3 job, rendezvous at the first node.
    m, text = _wait_for(log, r"^ranks by host: .*$", 240, cluster, job)
    line = m.group(0)
    for rank, (name, addr) in enumerate(NODES.items()):
        assert f"{name} ({addr}): [{rank}]" in line, line
    assert f"rendezvous {list(NODES)[0]}:" in line
    assert "2 rank(s) on cpu, ZeRO stage 3" in text

    # 2. Training advances; then the pre-emption signal, as Slurm sends it before a time limit.
    _wait_for(log, r"^step 3/%d " % STEPS, 240, cluster, job)
    cluster.run("scancel", "--signal=USR1", job)
    m, text = _wait_for(log, r"^pre-empted by SIGUSR1 after step (\d+): checkpoint saved$", 120,
                        cluster, job)
    stopped = int(m.group(1))
    assert 3 <= stopped < STEPS
    assert (out / "checkpoints" / f"step{stopped:08d}" / "COMPLETE").is_file()
    assert re.search(rf"^requeueing Slurm job {job}; the next run resumes from step {stopped}$",
                     text, re.M)

    # 3. The requeued job (same id, restart 1) resumes from that checkpoint and finishes.
    _wait_for(log, rf"^\[megaclip\] job {job} \(restart 1\)", 300, cluster, job)
    m, text = _wait_for(log, rf"resumed from step{stopped:08d} at step {stopped}$", 240,
                        cluster, job)
    m, text = _wait_for(log, rf"^saved checkpoint .*step{STEPS:08d}$", 300, cluster, job)
    after = text.split(f"resumed from step{stopped:08d}")[1]
    first_step = re.search(r"^step (\d+)/", after, re.M)
    assert first_step and int(first_step.group(1)) == stopped + 1, after[:2000]
    assert (out / "checkpoints" / f"step{STEPS:08d}" / "COMPLETE").is_file()
    end = time.time() + 60
    while cluster.job_state(job) not in ("COMPLETED", "FAILED", "CANCELLED") and time.time() < end:
        time.sleep(1)
    assert cluster.job_state(job) == "COMPLETED", cluster.logs()
