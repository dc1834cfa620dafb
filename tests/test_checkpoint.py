"""A checkpoint names the optimiser class whose state it holds; resuming with another is refused
before DeepSpeed loads a state it cannot use."""
import json

import pytest

from megaclip.checkpoint import MARKER, check_optimizer
from megaclip.errors import UserError


def test_resume_with_another_optimizer_class_is_refused(tmp_path):
    (tmp_path / "step00000010").mkdir()
    marker = tmp_path / "step00000010" / MARKER
    marker.write_text(json.dumps({"step": 10, "optimizer": "deepspeed.ops.adam.fused_adam.FusedAdam"}))
    check_optimizer(str(tmp_path / "step00000010"), "deepspeed.ops.adam.fused_adam.FusedAdam")
    with pytest.raises(UserError, match="holds the state of deepspeed.ops.adam.fused_adam.FusedAdam, "
                                        "but this run built torch.optim.adamw.AdamW"):
        check_optimizer(str(tmp_path / "step00000010"), "torch.optim.adamw.AdamW")
    marker.write_text(json.dumps({"step": 10}))  # written before checkpoints named it
    check_optimizer(str(tmp_path / "step00000010"), "torch.optim.adamw.AdamW")


def _choose(rank, port, root, hidden_on, results):
    import os

    import torch.distributed as dist

    from megaclip.checkpoint import choose_resume
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    real = os.path.isfile
    if rank == hidden_on:  # this rank's view of the file system lags: no marker yet
        os.path.isfile = lambda p: False if p.endswith(MARKER) else real(p)
    try:
        results[rank] = ("ok", choose_resume(root, "auto"))
    except UserError as e:
        results[rank] = ("error", str(e))
    finally:
        os.path.isfile = real
        dist.destroy_process_group()


@pytest.mark.distributed
def test_rank_0_chooses_the_checkpoint_and_every_rank_checks_it_sees_it(tmp_path):
    import torch.multiprocessing as tmp

    from tests.conftest import free_port
    for step in (2, 4):
        (tmp_path / f"step{step:08d}").mkdir()
        (tmp_path / f"step{step:08d}" / MARKER).write_text(json.dumps({"step": step}))
    for hidden_on, expect in ((None, "ok"), (1, "error")):
        with tmp.Manager() as manager:
            results = manager.dict()
            tmp.spawn(_choose, args=(free_port(), str(tmp_path), hidden_on, results), nprocs=2)
            results = dict(results)
        assert results[0][0] == results[1][0] == expect
        if expect == "ok":
            assert results[0][1] == results[1][1] == str(tmp_path / "step00000004")
        else:
            assert results[0][1] == results[1][1]
            assert "ranks [1] see [None]" in results[1][1] and "step00000004" in results[1][1]
