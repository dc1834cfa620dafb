"""The rank's device is chosen first (cuda:LOCAL_RANK under every launcher) and every collective
is handed tensors on it. CUDA is faked where it is missing: an accelerator that says "cuda", and
FakeTensorMode for tensors on cuda:3 that allocate nothing."""
import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from megaclip import distributed
from megaclip.distributed import (all_gather_cat, all_reduce_sum, check_collective_devices,
                                  gather_with_grad, setup_device)
from megaclip.engine.trainer import pack_for_reduce, unpack_reduced
from megaclip.errors import UserError


class FakeCuda:
    """What megaclip asks of DeepSpeed's accelerator, answered as a node with ``count`` GPUs."""

    def __init__(self, count=8):
        self.count, self.selected = count, []

    def device_name(self, index=None):
        return "cuda" if index is None else f"cuda:{index}"

    def device_count(self):
        return self.count

    def set_device(self, index):
        self.selected.append(index)


@pytest.fixture(autouse=True)
def restore_device(monkeypatch):
    monkeypatch.setattr(distributed, "_DEVICE", torch.device("cpu"))
    monkeypatch.delenv("MEGACLIP_CHECK_COLLECTIVES", raising=False)


def test_local_rank_3_gets_cuda_3_and_selects_it(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    acc = FakeCuda()
    assert setup_device(acc) == torch.device("cuda", 3)
    assert acc.selected == [3] and distributed.rank_device() == torch.device("cuda:3")


def test_an_srun_task_that_sees_one_gpu_uses_it_whatever_its_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "5")  # srun --gpus-per-task=1: each task sees its own GPU
    acc = FakeCuda(count=1)
    assert setup_device(acc, slurm_task=True) == torch.device("cuda", 0)
    assert acc.selected == [0]
    import os
    assert os.environ["LOCAL_RANK"] == "0"  # what DeepSpeed's zero.Init and engine read
    # Under another launcher two ranks would share the GPU: an error, not a silent remap.
    with pytest.raises(UserError, match="LOCAL_RANK is 1 but this task sees 1 cuda"):
        monkeypatch.setenv("LOCAL_RANK", "1")
        setup_device(FakeCuda(count=1))


def test_more_tasks_than_gpus_is_a_user_error(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(UserError, match="LOCAL_RANK is 5 but this task sees 4 cuda"):
        setup_device(FakeCuda(count=4))


def test_cpu_accelerator_gives_the_cpu(monkeypatch):
    from deepspeed.accelerator import get_accelerator
    monkeypatch.setenv("LOCAL_RANK", "1")
    if get_accelerator().device_name() != "cpu":
        pytest.skip("a GPU is visible; the CPU case needs DeepSpeed's CPU accelerator")
    assert setup_device() == torch.device("cpu")


@pytest.fixture
def two_fake_ranks(monkeypatch):
    """World size 2 with cuda:3 as this rank's device; collectives record what they receive."""
    monkeypatch.setenv("LOCAL_RANK", "3")
    setup_device(FakeCuda())
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    seen = []
    for name in ("all_reduce", "all_gather"):
        monkeypatch.setattr(dist, name, lambda *a, **k: seen.append(
            [t.device for t in distributed._tensors(a)]))
    return seen


def test_helpers_accept_the_rank_device_and_refuse_the_host(two_fake_ranks):
    with FakeTensorMode():
        all_reduce_sum(torch.ones(3, device="cuda:3"))
        all_gather_cat(torch.ones(2, 4, device="cuda:3"))
        assert two_fake_ranks and all(d == torch.device("cuda:3")
                                      for devices in two_fake_ranks for d in devices)
        for helper in (all_reduce_sum, all_gather_cat, gather_with_grad):
            with pytest.raises(RuntimeError, match="tensor on cpu, but this rank's device is cuda:3"):
                helper(torch.ones(2, 4))


def test_logged_values_are_packed_on_the_rank_device(two_fake_ranks):
    # The trainer's one all-reduce of a log step: loss terms (on the GPU) and skipped-sample
    # counts (host integers) go out as one vector on the rank's device.
    with FakeTensorMode():
        means = {"loss": torch.tensor(2.0, device="cuda:3"),
                 "clip": torch.tensor(1.5, device="cuda:3")}
        packed = pack_for_reduce(means, [3.0, 0.0], torch.device("cuda:3"))
        assert packed.device == torch.device("cuda:3") and packed.shape == (4,)
        all_reduce_sum(packed)
    values, counts = unpack_reduced([3.0, 4.0, 6.0, 0.0], ["clip", "loss"], world_size=2)
    assert values == {"clip": 1.5, "loss": 2.0} and counts == [6.0, 0.0]


def test_checked_collectives_refuse_a_tensor_off_the_rank_device(monkeypatch):
    for name in distributed._COLLECTIVES:  # so the wrappers are undone after the test
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, getattr(dist, name))
    setup_device(FakeCuda())  # LOCAL_RANK unset: cuda:0
    check_collective_devices()
    assert dist.all_reduce._megaclip_checked and dist.all_gather_into_tensor._megaclip_checked
    with pytest.raises(RuntimeError, match="all_reduce: a collective was handed a tensor on cpu"):
        dist.all_reduce(torch.ones(1))
    with pytest.raises(RuntimeError, match="all_gather_into_tensor: .* tensor on cpu"):
        dist.all_gather_into_tensor(output_tensor=torch.ones(2), input_tensor=torch.ones(1))
