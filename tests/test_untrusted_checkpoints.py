"""A checkpoint from elsewhere runs no code. A crafted file in place of any of DeepSpeed's (or
megaclip's) is refused by `--resume` at the same and at another world size, by tools/eval.py and
by tools/convert_checkpoint.py: exit code 2 naming the file, and the command it names never
runs. A `pipe:` or URL eval pattern in a checkpoint's config is never started. Real bf16
ZeRO-3 and ZeRO-2 checkpoints still load, every file weights-only."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from megaclip.checkpoint.safe_load import FORCE, check_files, weights_only_loads
from megaclip.errors import UserError
from tests.conftest import ROOT, launch_prefix, run_tool

DEEPSPEED_FILES = ["zero_pp_rank_0_mp_rank_00_model_states.pt",
                   "zero_pp_rank_1_mp_rank_00_model_states.pt",
                   "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                   "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


class Crafted:
    """Unpickled by anything but a weights-only loader, it runs ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _train(ranks, synthetic, out, *extra):
    cmd = [*launch_prefix(ranks), "megaclip/train.py", "--deepspeed_config", "ds_configs/zero3_cpu.json",
           "--config", "clip_tiny_synthetic",
           f"data.train_shards={synthetic}/train/shard-{{000000..000003}}.tar",
           f"data.tokenizer={synthetic}/spm.model", 'eval.shards=""', f"train.output_dir={out}",
           f"train.micro_batch_size={8 // ranks}", "train.log_every=1", "data.workers=1",
           "data.shuffle_buffer=16", "optim.warmup_steps=1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic):
    """A 2-rank fp32 ZeRO-3 checkpoint of 2 steps, copied by each case that crafts a file."""
    out = tmp_path_factory.mktemp("trained")
    proc = _train(2, synthetic, out, "train.steps=2", "train.ckpt_every=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tag = out / "checkpoints" / "step00000002"
    assert {f.name for f in tag.iterdir()} >= set(DEEPSPEED_FILES)
    return tag


def _crafted_copy(trained, tmp_path, name):
    """(a copy of the checkpoint with ``name`` crafted, the marker file it would create)."""
    tag, marker = tmp_path / "ckpt" / "step00000002", tmp_path / "MARKER"
    shutil.copytree(trained, tag)
    torch.save(Crafted(marker), tag / name)  # torch's zip format, as DeepSpeed's files are
    return tag, marker


def _assert_refused(proc, path, marker):
    out = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 2, out
    assert f"checkpoint file {path} holds objects megaclip does not load" in proc.stderr, out
    assert "refusing to run code from it" in proc.stderr and "Traceback" not in proc.stderr, out
    assert not marker.exists()


@pytest.mark.distributed
@pytest.mark.parametrize("ranks,name", [(2, n) for n in DEEPSPEED_FILES]
                         + [(1, n) for n in DEEPSPEED_FILES if "rank_1" in n])
def test_resume_refuses_a_crafted_file(trained, synthetic, tmp_path, ranks, name):
    """At 2 ranks (the saved size) every rank refuses, whichever rank's file it is; at 1 rank
    the file would have gone to DeepSpeed's universal conversion."""
    tag, marker = _crafted_copy(trained, tmp_path, name)
    proc = _train(ranks, synthetic, tmp_path / "out", "train.steps=3", "--resume", str(tag))
    _assert_refused(proc, tag / name, marker)


@pytest.mark.distributed
@pytest.mark.parametrize("name", DEEPSPEED_FILES)
def test_universal_conversion_refuses_a_crafted_file(trained, tmp_path, name):
    """DeepSpeed's ds_to_universal (its own process and workers) loads weights-only too."""
    from megaclip.checkpoint.io import _convert_universal
    tag, marker = _crafted_copy(trained, tmp_path, name)
    scratch = tmp_path / "scratch"
    with pytest.raises(UserError, match=re.escape(f"checkpoint file {tag / name} holds objects")):
        _convert_universal(str(tag), str(scratch), str(scratch / "u.tmp"))
    assert not marker.exists() and not (scratch / "u.tmp").exists()


@pytest.mark.distributed
@pytest.mark.parametrize("name", DEEPSPEED_FILES)
def test_eval_and_convert_refuse_a_crafted_file(trained, synthetic, tmp_path, name):
    tag, marker = _crafted_copy(trained, tmp_path, name)
    proc = run_tool("eval.py", "--checkpoint", str(tag), "--shards",
                    str(synthetic / "eval" / "shard-000000.tar"), "--classes",
                    str(synthetic / "eval" / "classes.json"), "--no-probes", check=False)
    _assert_refused(proc, tag / name, marker)
    proc = run_tool("convert_checkpoint.py", str(tag), "--out", str(tmp_path / "x"),
                    "--formats", "safetensors", check=False)
    _assert_refused(proc, tag / name, marker)


def _with_eval_set(trained, tmp_path, shards, classes):
    """A copy of the checkpoint whose config.yaml names ``shards`` and ``classes``."""
    import yaml
    tag = tmp_path / "ckpt" / "step00000002"
    shutil.copytree(trained, tag)
    cfg = yaml.safe_load((tag / "config.yaml").read_text())
    cfg["eval"].update(shards=shards, classes=classes)
    (tag / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return tag


@pytest.mark.distributed
def test_eval_starts_no_process_a_checkpoint_names(trained, synthetic, tmp_path):
    shard, classes = synthetic / "eval" / "shard-000000.tar", str(synthetic / "eval/classes.json")
    marker = tmp_path / "MARKER"
    for i, pattern in enumerate((f"pipe:touch {marker}; cat {shard}",
                                 f"{{pipe:touch {marker}; cat ,}}{shard}",  # hidden in braces
                                 "https://example.invalid/shard-{000..001}.tar")):
        tag = _with_eval_set(trained, tmp_path / str(i), pattern, classes)
        proc = run_tool("eval.py", "--checkpoint", str(tag), check=False)  # no set given
        assert proc.returncode == 2 and "give one evaluation set" in proc.stderr, proc.stderr
        proc = run_tool("eval.py", "--checkpoint", str(tag), "--use-run-eval-set", check=False)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"'{pattern}', names a command or URL" in proc.stderr
        assert "Traceback" not in proc.stderr and not marker.exists()
    # The run's own local files, when asked for.
    tag = _with_eval_set(trained, tmp_path / "local", str(shard), classes)
    proc = run_tool("eval.py", "--checkpoint", str(tag), "--use-run-eval-set", "--no-probes")
    assert "zeroshot_top1" in proc.stdout


@pytest.mark.distributed
def test_eval_and_export_refuse_another_tokenizer_naming_both(trained, synthetic, tmp_path):
    """The config names the tokenizer by path; a file with other bytes at that path (retrained
    or replaced) would give the same ids other pieces."""
    import yaml
    tag = tmp_path / "ckpt" / "step00000002"
    shutil.copytree(trained, tag)
    other = tmp_path / "spm.model"
    other.write_bytes((synthetic / "spm.model").read_bytes() + b"\0")
    cfg = yaml.safe_load((tag / "config.yaml").read_text())
    cfg["data"]["tokenizer"] = str(other)
    (tag / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for proc in (run_tool("eval.py", "--checkpoint", str(tag), "--shards",
                          str(synthetic / "eval" / "shard-000000.tar"), "--classes",
                          str(synthetic / "eval" / "classes.json"), "--no-probes", check=False),
                 run_tool("convert_checkpoint.py", str(tag), "--out", str(tmp_path / "x"),
                          "--formats", "open_clip", check=False)):
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"was trained with tokenizer {synthetic / 'spm.model'}" in proc.stderr
        assert f"but {other} has sha256" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_weights_only_loads_names_the_file_and_leaves_torch_as_it_was(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    marker, crafted, plain = tmp_path / "MARKER", tmp_path / "crafted.pt", tmp_path / "plain.pt"
    torch.save({"x": Crafted(marker)}, crafted)
    torch.save({"stage": ZeroStageEnum.weights, "scaler": LossScaler(1.0),
                "address": fragment_address(numel=3, start=5), "t": torch.ones(2)}, plain)
    load, before = torch.load, os.environ.get(FORCE)
    with weights_only_loads():
        refused = f"checkpoint file {crafted} holds objects megaclip does not load " \
                  f"(GLOBAL posix.system)"
        with pytest.raises(UserError, match=re.escape(refused)):
            torch.load(crafted, weights_only=False)  # as DeepSpeed asks
        state = torch.load(plain, weights_only=False)
    assert not marker.exists()
    assert state["stage"] is ZeroStageEnum.weights and state["scaler"].cur_scale == 1.0
    assert state["address"] == fragment_address(numel=3, start=5)
    assert torch.load is load and os.environ.get(FORCE) == before


def test_crafted_files_of_megaclip_are_named_too(tmp_path):
    """The client state and the EMA teacher shards: refused before anything loads them."""
    from megaclip.teacher.state import consolidate_teacher
    marker = tmp_path / "MARKER"
    for sub in ("client", "teacher"):
        (tmp_path / sub).mkdir()
        torch.save(Crafted(marker), tmp_path / sub / "rank00000.pt")
    with pytest.raises(UserError, match=re.escape(f"file {tmp_path}/client/rank00000.pt holds")):
        check_files(str(tmp_path))
    with pytest.raises(UserError, match=re.escape(f"file {tmp_path}/teacher/rank00000.pt holds")):
        consolidate_teacher(str(tmp_path))
    assert not marker.exists()


@pytest.mark.distributed
@pytest.mark.parametrize("ds_config", ["zero3_bf16.json", "zero2_bf16.json"])
def test_bf16_checkpoints_resume_and_convert_weights_only(synthetic, tmp_path, ds_config):
    """Two bf16 steps at one rank, saved, loaded into a fresh engine by megaclip's resume and
    saved again: the same fp32 weights; converted by tools/convert_checkpoint.py."""
    from megaclip.checkpoint.io import consolidate
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "bf16_checkpoint.py"),
                           os.path.join(ROOT, "ds_configs", ds_config),
                           str(synthetic / "spm.model"), str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved, again = tmp_path / "a" / "step00000002", tmp_path / "b" / "step00000002"
    assert any(f.name.startswith("bf16_") for f in saved.iterdir())
    a, b = consolidate(str(saved)), consolidate(str(again))
    assert a.keys() == b.keys() and len(a) > 50
    for k in a:
        assert torch.equal(a[k], b[k]), k
    run_tool("convert_checkpoint.py", str(saved), "--out", str(tmp_path / "x"), "--formats",
             "safetensors")
    assert (tmp_path / "x" / "model.safetensors").is_file()
