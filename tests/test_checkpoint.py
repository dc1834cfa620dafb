"""Checkpoint folders without DeepSpeed: the optimiser class a checkpoint names, what interrupted
writes leave and how it is finished or removed, folders moved aside, and the choice of the resume
checkpoint at world size 2 (rank 0 chooses; its errors reach every rank)."""
import json
import os

import pytest

from megaclip.checkpoint.io import check_optimizer
from megaclip.checkpoint.folder import (MARKER, clean_interrupted, complete_checkpoints,
                                        lock_output, move_aside)
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


def _checkpoint(folder, step, marker=True):
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"w%d" % step)
    if marker:
        (folder / MARKER).write_text(json.dumps({"step": step}))


def test_what_interrupted_writes_left_is_finished_or_removed_never_guessed(tmp_path):
    _checkpoint(tmp_path / "step00000002", 2)
    _checkpoint(tmp_path / "step00000004.tmp", 4)  # marker written, rename missing: finish it
    _checkpoint(tmp_path / "step00000006.tmp", 6, marker=False)  # half written: remove it
    _checkpoint(tmp_path / "step00000002.replaced", 1)  # old copy of a finished replacement
    _checkpoint(tmp_path / "step00000008.replaced", 8)  # the replacement never arrived
    _checkpoint(tmp_path / "step00000001.delete", 1)  # retention was removing it
    _checkpoint(tmp_path / "step00000010", 10, marker=False)  # not written by megaclip
    done = clean_interrupted(str(tmp_path))
    assert done == [
        "removed step00000001.delete, left by an interrupted checkpoint write",
        "completed step00000004: its write had finished, only its rename had not",
        "removed step00000006.tmp, left by an interrupted checkpoint write",
        "restored step00000008: the save that was replacing it was interrupted",
        "ignored step00000010: no COMPLETE marker, not a checkpoint megaclip wrote"]
    assert sorted(os.listdir(tmp_path)) == ["step00000002", "step00000004", "step00000008",
                                            "step00000010"]
    assert (tmp_path / "step00000002" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
            ).read_bytes() == b"w2"  # the newer copy won
    assert [t for _, t in complete_checkpoints(str(tmp_path))] == [
        "step00000002", "step00000004", "step00000008"]
    assert clean_interrupted(str(tmp_path)) == [
        "ignored step00000010: no COMPLETE marker, not a checkpoint megaclip wrote"]


def test_a_marker_cut_short_is_no_marker(tmp_path):
    _checkpoint(tmp_path / "step00000002", 2)
    _checkpoint(tmp_path / "step00000004.tmp", 4, marker=False)
    (tmp_path / "step00000004.tmp" / MARKER).write_text("")  # written by an older version, cut
    assert clean_interrupted(str(tmp_path)) == [
        "removed step00000004.tmp, left by an interrupted checkpoint write"]
    assert [t for _, t in complete_checkpoints(str(tmp_path))] == ["step00000002"]


def test_a_move_aside_cut_short_is_finished_before_anything_resumes(tmp_path):
    for step in (2, 4, 6):
        _checkpoint(tmp_path / f"step{step:08d}", step)
    # The intent was written and step 4 moved when the process died; step 6 is still there.
    (tmp_path / "MOVING_ASIDE").write_text(json.dumps({"after_step": 2}))
    (tmp_path / "aside-20260101-000000").mkdir()
    os.rename(tmp_path / "step00000004", tmp_path / "aside-20260101-000000" / "step00000004")
    done = clean_interrupted(str(tmp_path))
    assert len(done) == 1 and "finishing the move of an interrupted resume from step 2" in done[0]
    assert [t for _, t in complete_checkpoints(str(tmp_path))] == ["step00000002"]
    assert not (tmp_path / "MOVING_ASIDE").exists()


def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path):
    import subprocess
    import sys
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from megaclip.checkpoint.folder import lock_output; "
        f"lock = lock_output({str(tmp_path)!r}); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"is in use by another run \(pid {holder.pid} on "):
            lock_output(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    lock_output(str(tmp_path)).close()  # released with the process that held it


def test_moving_aside_twice_in_one_second_keeps_both(tmp_path):
    for step in (2, 4, 6):
        _checkpoint(tmp_path / f"step{step:08d}", step)
    first = move_aside(str(tmp_path), 4)
    _checkpoint(tmp_path / "step00000006", 6)
    second = move_aside(str(tmp_path), 4)
    assert len(first) == len(second) == 1 and os.path.dirname(first[0]) != os.path.dirname(second[0])
    assert all(os.path.isfile(os.path.join(p, MARKER)) for p in first + second)


def _choose(rank, port, root, hidden_on, results, resume="auto"):
    import os

    import torch.distributed as dist

    from megaclip.checkpoint.io import choose_resume
    from megaclip.checkpoint.folder import prepare_output
    from megaclip.distributed import on_rank0
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    real = os.path.isfile
    if rank == hidden_on:  # this rank's view of the file system lags: no marker yet
        os.path.isfile = lambda p: False if p.endswith(MARKER) else real(p)
    try:
        on_rank0(prepare_output, root, resume)  # as the trainer does, first
        results[rank] = ("ok", choose_resume(root, resume))
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


@pytest.mark.distributed
def test_rank_0s_refusal_reaches_every_rank(tmp_path):
    """A fresh start (no --resume) in a folder that holds checkpoints, or a --resume path that is
    not a checkpoint: rank 0 finds out, every rank raises the same error instead of waiting."""
    import torch.multiprocessing as tmp

    from tests.conftest import free_port
    (tmp_path / "step00000002").mkdir()
    (tmp_path / "step00000002" / MARKER).write_text(json.dumps({"step": 2}))
    for resume, message in ((None, "already holds checkpoints (newest: step00000002); continue"),
                            (str(tmp_path / "nope"), "not a complete megaclip checkpoint")):
        with tmp.Manager() as manager:
            results = manager.dict()
            tmp.spawn(_choose, args=(free_port(), str(tmp_path), None, results, resume), nprocs=2)
            results = dict(results)
        assert results[0] == results[1] and results[0][0] == "error", results
        assert message in results[0][1]


class _FakeCuda:
    """torch.cuda as a rank that uses device ``current`` of ``count`` visible GPUs sees it; the
    all-device calls fail, as they would on a node with fewer GPUs than the saved list."""

    def __init__(self, current, count):
        self.current, self.count, self.set = current, count, []

    def install(self, monkeypatch):
        import torch
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "get_rng_state",
                            lambda device="cuda": torch.full((4,), self.current, dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, "set_rng_state",
                            lambda state, device="cuda": self.set.append(state.tolist()))

        def all_devices(*a, **k):
            raise RuntimeError("the all-device RNG calls must not be used")
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", all_devices)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", all_devices)


def test_the_rng_state_holds_the_ranks_own_gpu_only_and_old_lists_still_load(monkeypatch):
    import torch
    from megaclip.checkpoint.train_state import rng_state, set_rng_state
    cuda = _FakeCuda(current=3, count=8)
    cuda.install(monkeypatch)
    state = rng_state()
    assert state["cuda"].tolist() == [3] * 4  # one tensor: this rank's device
    set_rng_state(state)
    assert cuda.set == [[3] * 4]
    # Written before: every visible GPU's state. The rank's own entry where it exists ...
    old = {**state, "cuda": [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]}
    set_rng_state(old)
    assert cuda.set[-1] == [3] * 4
    # ... and the first on a task that sees fewer GPUs than were saved (no crash).
    old["cuda"] = old["cuda"][:2]
    set_rng_state(old)
    assert cuda.set[-1] == [0] * 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU resume of a GPU run
    set_rng_state(old)
    assert len(cuda.set) == 3


def _convert_slowly(rank, port, scratch, fail, results):
    """Rank 0's conversion (faked) takes 6 s under a 2 s process-group timeout."""
    import datetime
    import time

    import torch.distributed as dist

    from megaclip.checkpoint import io
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=2))

    def convert(tag_dir, scratch_, out):
        time.sleep(6)
        if fail:
            raise UserError("checkpoint file refused")
        return out
    io._convert_universal = convert
    try:
        path, result_file = io._to_universal("/ckpt/step00000002", scratch, 60)
        dist.barrier()  # the group still works after the long wait
        results[rank] = ("ok", path, os.path.basename(result_file))
    except UserError as e:
        results[rank] = ("error", str(e))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_wait_for_a_conversion_longer_than_the_collective_timeout(tmp_path):
    import torch.multiprocessing as tmp

    from tests.conftest import free_port
    for fail in (False, True):
        with tmp.Manager() as manager:
            results = manager.dict()
            tmp.spawn(_convert_slowly, args=(free_port(), str(tmp_path), fail, results), nprocs=2)
            results = dict(results)
        assert results[0] == results[1], results
        if fail:
            assert results[0] == ("error", "checkpoint file refused")
        else:
            assert results[0][1] == str(tmp_path / "step00000002.universal.tmp")
            assert results[0][2] in os.listdir(tmp_path)  # rank 0's result, read by rank 1
