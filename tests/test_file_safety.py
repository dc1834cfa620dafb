"""Nothing is lost or mixed silently: the tools refuse an output that exists unless --force (which
replaces it whole), a checkpoint save moves a folder it did not write aside, results newer than
a resumed checkpoint move aside with its newer checkpoints, a cut metrics line is skipped, and
untrusted inputs (a config chain, prompt templates, the lock file) are checked."""
import json
import logging
import os
import sys

import pytest
from PIL import Image

from megaclip.checkpoint.folder import (MARKER, clean_interrupted, complete_checkpoints,
                                        lock_output, move_aside, publish, write_json)
from megaclip.errors import UserError
from tests.conftest import ROOT, run_tool


def _checkpoint(folder, step, marker=True):
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"w%d" % step)
    if marker:
        (folder / MARKER).write_text(json.dumps({"step": step}))


def _tree(folder):
    """{relative path: bytes} of every file under ``folder``."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


# --------------------------------------------------------------------------- checkpoint folder
def test_publish_moves_a_folder_without_marker_aside_never_deletes_it(tmp_path, caplog):
    root = tmp_path
    (root / "step00000004").mkdir()
    (root / "step00000004" / "notes.txt").write_text("my notes")  # a user's folder, no marker
    _checkpoint(root / "step00000004.tmp", 4)
    with caplog.at_level(logging.WARNING, logger="megaclip"):
        notes = publish(str(root), "step00000004", keep=0)
    aside = [d for d in os.listdir(root) if d.startswith("step00000004.aside-")]
    assert len(aside) == 1 and (root / aside[0] / "notes.txt").read_text() == "my notes"
    assert len(notes) == 1 and str(root / aside[0]) in notes[0] and "no COMPLETE marker" in notes[0]
    assert notes[0] in caplog.text
    assert [t for _, t in complete_checkpoints(str(root))] == ["step00000004"]
    # A complete checkpoint of the same step is replaced, as before: no note.
    _checkpoint(root / "step00000004.tmp", 4)
    assert publish(str(root), "step00000004", keep=0) == []
    assert sorted(os.listdir(root)) == sorted(["step00000004", aside[0]])


def test_a_finished_write_whose_name_is_taken_moves_the_taker_aside(tmp_path):
    (tmp_path / "step00000006").mkdir()
    (tmp_path / "step00000006" / "notes.txt").write_text("mine")
    _checkpoint(tmp_path / "step00000006.tmp", 6)  # marker written, rename missing
    done = clean_interrupted(str(tmp_path))
    aside = [d for d in os.listdir(tmp_path) if d.startswith("step00000006.aside-")]
    assert len(aside) == 1 and (tmp_path / aside[0] / "notes.txt").read_text() == "mine"
    assert done == [f"moved step00000006 aside to {aside[0]}: no COMPLETE marker, not a "
                    f"checkpoint megaclip wrote",
                    "completed step00000006: its write had finished, only its rename had not"]
    assert [t for _, t in complete_checkpoints(str(tmp_path))] == ["step00000006"]


def test_the_lock_file_is_never_opened_through_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "ckpt").mkdir()
    os.symlink(victim, tmp_path / "ckpt" / "LOCK")
    with pytest.raises(UserError, match=r"ckpt/LOCK is a symbolic link"):
        lock_output(str(tmp_path / "ckpt"))
    assert victim.read_text() == "precious"
    os.remove(tmp_path / "ckpt" / "LOCK")
    lock_output(str(tmp_path / "ckpt")).close()  # a plain file: locked as before
    assert (tmp_path / "ckpt" / "LOCK").is_file() and not (tmp_path / "ckpt" / "LOCK").is_symlink()


# --------------------------------------------------------------------------- results of a run
def test_eval_results_are_written_whole(tmp_path):
    path = tmp_path / "eval_step00000010.json"
    write_json(str(path), {"step": 10, "zeroshot_top1": 0.5}, indent=1)
    assert json.loads(path.read_text()) == {"step": 10, "zeroshot_top1": 0.5}
    with pytest.raises(TypeError):  # a write that fails leaves the old file whole
        write_json(str(path), {"step": 10, "bad": object()})
    assert json.loads(path.read_text()) == {"step": 10, "zeroshot_top1": 0.5}


def test_the_trainer_writes_its_results_through_the_atomic_writer():
    import inspect

    from megaclip.engine.trainer import Trainer
    source = inspect.getsource(Trainer.evaluate)
    assert "write_json(" in source and "open(" not in source


def test_results_newer_than_the_resumed_checkpoint_move_aside_with_its_checkpoints(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    for step in (2, 4):
        _checkpoint(ckpts / f"step{step:08d}", step)
    for step in (2, 3, 4):
        (run / f"eval_step{step:08d}.json").write_text(json.dumps({"step": step}))
    moved = move_aside(str(ckpts), 2, str(run))
    aside = [d for d in os.listdir(ckpts) if d.startswith("aside-")]
    assert len(aside) == 1
    assert moved == [str(ckpts / aside[0] / n) for n in (
        "step00000004", "eval_step00000003.json", "eval_step00000004.json")]
    assert sorted(os.listdir(run)) == ["checkpoints", "eval_step00000002.json"]
    assert json.loads((ckpts / aside[0] / "eval_step00000004.json").read_text()) == {"step": 4}
    # Results alone (no newer checkpoint) go aside too.
    (run / "eval_step00000005.json").write_text("{}")
    assert len(move_aside(str(ckpts), 2, str(run))) == 1
    assert sorted(os.listdir(run)) == ["checkpoints", "eval_step00000002.json"]


def test_an_interrupted_move_aside_finishes_with_the_results(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    _checkpoint(ckpts / "step00000002", 2)
    (run / "eval_step00000004.json").write_text("{}")
    (ckpts / "MOVING_ASIDE").write_text(json.dumps({"after_step": 2, "eval_dir": str(run)}))
    done = clean_interrupted(str(ckpts))
    assert len(done) == 1 and "eval_step00000004.json aside: finishing the move" in done[0]
    assert not (run / "eval_step00000004.json").exists()


def test_a_cut_last_metrics_line_is_skipped_with_a_warning(tmp_path, caplog):
    from megaclip.engine.metrics import MetricLogger
    from megaclip.reports import read_metrics
    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[1][:17])
    with caplog.at_level(logging.WARNING, logger="megaclip"):
        rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2]
    assert "metrics.jsonl: line 3 is not a whole JSON record" in caplog.text
    # A resumed run appends after the cut line, not onto it: its lines stay whole.
    log = MetricLogger(None, True, 10, str(tmp_path / "metrics.jsonl"))
    log.scalars(3, {"loss": 0.25}, "train/")
    log.close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]


# --------------------------------------------------------------------------- untrusted inputs
def test_a_config_whose_base_comes_back_is_an_error_naming_the_chain(tmp_path):
    from megaclip.config import load_config
    (tmp_path / "self.yaml").write_text(f"base: {tmp_path / 'self.yaml'}\n")
    with pytest.raises(UserError, match=r"in a cycle \(base:\): .*self.yaml -> .*self.yaml"):
        load_config(str(tmp_path / "self.yaml"))
    (tmp_path / "a.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\ntrain:\n  steps: 3\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(UserError, match=r"a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config(str(tmp_path / "a.yaml"))
    proc = _train("--config", str(tmp_path / "a.yaml"))
    assert proc.returncode == 2 and "in a cycle" in proc.stderr and "Traceback" not in proc.stderr


def _train(*args):
    import subprocess
    return subprocess.run([sys.executable, os.path.join(ROOT, "megaclip", "train.py"),
                           "--deepspeed_config", "ds_configs/zero3_cpu.json", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("template,problem", [
    ("a photo of a {c}.", "field {c} is not the class name's"),
    ("{0.__class__}", "field {0.__class__} is not"),
    ("a {} and a {}", "goes in once as {}"),
    ("a {!r}", "no conversion or format spec"),
    ("a photo.", "no {} where the class name goes"),
    ("a { photo", "write a literal brace as {{ or }}"),
])
def test_a_bad_template_in_a_classes_file_is_an_error_naming_it(tmp_path, template, problem):
    from megaclip.data.eval_set import EvalSet
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"classnames": ["cat"], "templates": ["a {}.", template]}))
    with pytest.raises(UserError) as e:
        EvalSet(str(tmp_path / "none-{0..1}.tar"), str(classes), 16, (0.5,) * 3, (0.5,) * 3)
    assert f"template {template!r}" in str(e.value) and problem in str(e.value)
    assert str(classes) in str(e.value)


def test_good_templates_pass_and_background_prompts_need_no_field():
    from megaclip.data.eval_set import check_templates
    check_templates(["a {}.", "{0} or {0}", "a {{literal}} {}"], "here")
    check_templates(["a plain background."], "here", placeholder=False)
    with pytest.raises(UserError, match="field {x}"):
        check_templates(["background {x}"], "here", placeholder=False)


def test_make_eval_set_refuses_a_bad_template_file(tmp_path):
    _images(tmp_path / "images")
    (tmp_path / "t.txt").write_text("a photo of {}.\na photo of {name}.\n")
    proc = run_tool("make_eval_set.py", "--images", str(tmp_path / "images"), "--templates",
                    str(tmp_path / "t.txt"), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "'a photo of {name}.'" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- --out and --force
def _images(root, classes=("cat", "dog"), per_class=2):
    for c, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), (90 * c, 40 * i, 10)).save(root / name / f"{i}.png")


def _refused_then_replaced(tool, args, out, tmp_path):
    """``out`` holds a stale file: the tool refuses it (exit 2, naming it) and leaves it as it
    was; with --force the new output replaces it whole (the stale file is gone, nothing is left
    beside it)."""
    out.mkdir(exist_ok=True)
    (out / "stale.txt").write_text("from before")
    before = _tree(out)
    proc = run_tool(tool, *args, "--out", str(out), check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"--out {out}: the folder is not empty" in proc.stderr and "--force" in proc.stderr
    assert _tree(out) == before
    proc = run_tool(tool, *args, "--out", str(out), "--force")
    assert not (out / "stale.txt").exists() and _tree(out)
    assert not [n for n in os.listdir(out.parent) if ".partial-" in n or ".replaced-" in n]
    return proc


def test_make_shards_refuses_a_used_out_and_force_replaces_it_whole(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (200, 10, 10 * i)).save(images / f"{i}.png")
    (tmp_path / "c.csv").write_text("image,caption\n" + "".join(
        f"{i}.png,red square {i}\n" for i in range(4)))
    args = ["--images", str(images), "--captions", str(tmp_path / "c.csv"), "--shard-size", "2"]
    # Four shards first, then two: no third shard of the old set is left among the new ones.
    run_tool("make_shards.py", *args[:-1], "1", "--out", str(tmp_path / "shards"))
    proc = _refused_then_replaced("make_shards.py", args, tmp_path / "shards", tmp_path)
    assert sorted(os.listdir(tmp_path / "shards")) == ["shard-000000.tar", "shard-000001.tar"]
    assert f"{tmp_path / 'shards'}/shard-{{000000..000001}}.tar" in proc.stdout
    # --force never deletes an input with the folder it replaces.
    proc = run_tool("make_shards.py", *args, "--out", str(tmp_path), "--force", check=False)
    assert proc.returncode == 2 and "would delete" in proc.stderr and images.is_dir()


def test_make_eval_set_refuses_a_used_out_and_force_replaces_it_whole(tmp_path):
    _images(tmp_path / "images")
    args = ["--images", str(tmp_path / "images"), "--splits", "train=0.5,test=0.5"]
    run_tool("make_eval_set.py", *args, "--out", str(tmp_path / "out"))
    _refused_then_replaced("make_eval_set.py", args[:2], tmp_path / "out", tmp_path)
    assert sorted(os.listdir(tmp_path / "out")) == ["classes.json", "test"]  # no old train/


def test_train_tokenizer_refuses_to_overwrite_a_tokenizer_unless_forced(tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"a red circle number {i}\n" for i in range(50)))
    (tmp_path / "b.txt").write_text("".join(f"two blue squares, {i} times\n" for i in range(50)))
    spm = str(tmp_path / "spm")
    run_tool("train_tokenizer.py", "--text", str(tmp_path / "a.txt"), "--out", spm,
             "--vocab-size", "40")
    before = (tmp_path / "spm.model").read_bytes()
    proc = run_tool("train_tokenizer.py", "--text", str(tmp_path / "b.txt"), "--out", spm,
                    "--vocab-size", "40", check=False)
    assert proc.returncode == 2 and f"--out {spm}.model: the file exists" in proc.stderr
    assert (tmp_path / "spm.model").read_bytes() == before
    run_tool("train_tokenizer.py", "--text", str(tmp_path / "b.txt"), "--out", spm,
             "--vocab-size", "40", "--force")
    assert (tmp_path / "spm.model").read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt", "spm.model", "spm.vocab"]


def test_convert_checkpoint_refuses_a_used_out(tmp_path):
    """Refused before the checkpoint is read (the replacement with --force: tests/engine/
    test_checkpoint_safety.py, on a real checkpoint)."""
    _checkpoint(tmp_path / "step00000002", 2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"an older export")
    proc = run_tool("convert_checkpoint.py", str(tmp_path / "step00000002"), "--out",
                    str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    assert f"--out {tmp_path / 'out'}: the folder is not empty" in proc.stderr
    (tmp_path / "file").write_text("x")
    proc = run_tool("convert_checkpoint.py", str(tmp_path / "step00000002"), "--out",
                    str(tmp_path / "file"), "--force", check=False)
    assert proc.returncode == 2 and "is a file; give a folder" in proc.stderr
    proc = run_tool("convert_checkpoint.py", str(tmp_path / "step00000002"), "--out",
                    str(tmp_path), "--force", check=False)
    assert proc.returncode == 2 and "would delete" in proc.stderr
    assert (tmp_path / "step00000002" / MARKER).is_file()


def test_setup_logs_to_a_file_of_its_own_and_asks_for_webdataset_1():
    script = open(os.path.join(ROOT, "tools", "setup_env.sh")).read()
    assert "/tmp/megaclip-setup.log" not in script and "mktemp" in script
    assert '"webdataset>=1.0"' in open(os.path.join(ROOT, "setup.py")).read()


def test_a_checkpoint_names_its_tokenizer_and_refuses_another(tmp_path):
    """The record a checkpoint keeps (the real runs: tests/engine/test_checkpoint_safety.py)."""
    from megaclip.checkpoint.train_state import TOKENIZER_FILE, check_tokenizer, tokenizer_record
    (tmp_path / "a.model").write_bytes(b"tokenizer a")
    (tmp_path / "b.model").write_bytes(b"tokenizer b")
    _checkpoint(tmp_path / "step00000002", 2)
    tag = str(tmp_path / "step00000002")
    assert "records no tokenizer" in check_tokenizer(tag, str(tmp_path / "a.model"))[0]
    record = tokenizer_record(str(tmp_path / "a.model"))
    (tmp_path / "step00000002" / TOKENIZER_FILE).write_text(json.dumps(record))
    assert check_tokenizer(tag, str(tmp_path / "a.model")) == []
    os.rename(tmp_path / "a.model", tmp_path / "moved.model")  # the same bytes elsewhere: fine
    assert check_tokenizer(tag, str(tmp_path / "moved.model")) == []
    with pytest.raises(UserError) as e:
        check_tokenizer(tag, str(tmp_path / "b.model"))
    b_sha = tokenizer_record(str(tmp_path / "b.model"))["sha256"]
    for named in (record["path"], record["sha256"], str(tmp_path / "b.model"), b_sha):
        assert named in str(e.value)
