import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every process a test starts (the deepspeed launcher's ranks, sbatch jobs, tools) checks that
# each torch.distributed collective gets tensors on the rank's device, as NCCL requires.
os.environ["MEGACLIP_CHECK_COLLECTIVES"] = "1"


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A small synthetic set + tokenizer, built once per session with the real tools."""
    out = tmp_path_factory.mktemp("synthetic")
    run_tool("make_synthetic.py", "--out", str(out), "--train-samples", "1200",
             "--eval-per-class", "2", "--shard-size", "300")
    run_tool("train_tokenizer.py", "--shards", str(out / "train" / "shard-{000000..000003}.tar"),
             "--out", str(out / "spm"), "--vocab-size", "128")
    return out


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo group for zero.Init and in-process DeepSpeed engines, torn down with the
    environment it needed, so that later tests (and the processes they start) inherit neither.
    DeepSpeed keeps the groups it made from the old process group (``deepspeed.utils.groups``):
    they are forgotten on both ends, so a later module's group is the one DeepSpeed uses."""
    import torch.distributed as dist
    from megaclip.distributed import default_env, init_distributed
    saved = dict(os.environ)
    _forget_deepspeed_groups()
    default_env()
    try:
        init_distributed(dist_backend="gloo")
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        _forget_deepspeed_groups()
        os.environ.clear()
        os.environ.update(saved)


def _forget_deepspeed_groups() -> None:
    from deepspeed.utils import groups
    groups._WORLD_GROUP = None
    groups._DATA_PARALLEL_GROUP = None


def shared_memory_buffers() -> set:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm (66 MB of RAM each): a run, killed or not,
    must leave none behind."""
    import glob
    return set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))


def free_port() -> int:
    """A TCP port free right now, for a launcher's rendezvous (no clash with other runs)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_prefix(ranks: int) -> list[str]:
    """How a test starts ``megaclip/train.py`` on ``ranks`` CPU processes: one plain process,
    or DeepSpeed's launcher on a free rendezvous port."""
    if ranks == 1:
        return [sys.executable, "-u"]
    return [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks),
            "--master_port", str(free_port())]


def tiny_train_command(ranks: int, synthetic, out, *extra) -> list[str]:
    """``megaclip/train.py`` on ``ranks`` CPU processes: the tiny experiment, ZeRO-3 fp32, on the
    synthetic set, a global batch of 8, a log line every step; ``extra`` overrides or flags."""
    return [*launch_prefix(ranks), "megaclip/train.py", "--deepspeed_config",
            "ds_configs/zero3_cpu.json", "--config", "clip_tiny_synthetic",
            f"data.train_shards={synthetic}/train/shard-{{000000..000003}}.tar",
            f"data.tokenizer={synthetic}/spm.model", 'eval.shards=""', f"train.output_dir={out}",
            f"train.micro_batch_size={8 // ranks}", "train.log_every=1", *extra]


def run_tool(name, *args, check=True, **kw):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args],
                          capture_output=True, text=True, cwd=ROOT, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def synthetic_overrides(root, out_dir):
    """Overrides that point the tiny experiment at a synthetic set built by the fixture."""
    return [f"data.train_shards={root}/train/shard-{{000000..000003}}.tar",
            f"data.tokenizer={root}/spm.model",
            f"eval.shards={root}/eval/shard-000000.tar",
            f"eval.classes={root}/eval/classes.json",
            f"train.output_dir={out_dir}"]
