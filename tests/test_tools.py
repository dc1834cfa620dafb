"""Every command has --help, and bad input is a clear message with exit code 2."""
import csv
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, run_tool

TOOLS = ["make_shards.py", "make_synthetic.py", "train_tokenizer.py", "eval.py", "compare_runs.py",
         "bench_objectives.py", "bench_resume.py", "bench_data.py", "convert_checkpoint.py",
         "make_eval_set.py", "fuzz_shards.py", "wheelhouse.py", "gpu_check.py"]


def run_train(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "megaclip", "train.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("tool", TOOLS)
def test_help(tool):
    proc = run_tool(tool, "--help")
    assert proc.returncode == 0 and "example" in proc.stdout


@pytest.mark.parametrize("tool", TOOLS)
def test_bad_arguments_exit_2(tool):
    proc = run_tool(tool, "--no-such-flag", check=False)
    assert proc.returncode == 2 and "error" in proc.stderr


def test_train_help():
    proc = run_train("--help")
    assert proc.returncode == 0 and "deepspeed" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["train.stpes=3"], "unknown config key 'train.stpes'"),
    (["data.train_shards=/nonexistent/shard-{000..009}.tar"],
     "'/nonexistent/shard-{000..009}.tar' matches no file"),
])
def test_train_bad_config_exits_2(args, message):
    proc = run_train("--config", "clip_tiny_synthetic", "--deepspeed_config",
                     "ds_configs/zero3_cpu.json", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_train_contradicting_deepspeed_json_exits_2(tmp_path, synthetic):
    from tests.conftest import synthetic_overrides
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 7, "zero_optimization": {"stage": 3}}))
    proc = run_train("--config", "clip_tiny_synthetic", "--deepspeed_config", str(ds),
                     *synthetic_overrides(synthetic, tmp_path / "out"))
    assert proc.returncode == 2 and "train_micro_batch_size_per_gpu=7" in proc.stderr


def _png(path, side=16):
    Image.new("RGB", (side, side), (200, 10, 10)).save(path)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_make_shards_validates_and_summarises(tmp_path, fmt):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        _png(images / f"ok{i}.png")
    (images / "broken.jpg").write_bytes(b"not an image at all")
    rows = [(f"ok{i}.png", f"a red square number {i}") for i in range(5)]
    rows += [("broken.jpg", "broken"), ("missing.png", "gone"), ("ok0.png", "")]
    cap = tmp_path / f"captions.{fmt}"
    if fmt == "jsonl":
        cap.write_text("".join(json.dumps({"image": a, "caption": b}) + "\n" for a, b in rows))
    else:
        with open(cap, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
            w.writerow(["image", "caption"])
            w.writerows(rows)
    proc = run_tool("make_shards.py", "--images", str(images), "--captions", str(cap),
                    "--out", str(tmp_path / "shards"), "--shard-size", "3")
    assert "wrote 5 samples in 2 shards" in proc.stdout
    assert "skipped 3 rows: missing_caption 1, missing_image 1, undecodable_image 1" in proc.stdout
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as t:
        names = t.getnames()
    assert len(names) == 6 and any(n.endswith(".png") for n in names)


def test_make_shards_missing_captions_file_exits_2(tmp_path):
    proc = run_tool("make_shards.py", "--images", str(tmp_path), "--captions",
                    str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "nope.csv' does not exist" in proc.stderr


def test_make_synthetic_is_deterministic(tmp_path):
    for d in ("a", "b"):
        run_tool("make_synthetic.py", "--out", str(tmp_path / d), "--train-samples", "20",
                 "--eval-per-class", "1", "--seed", "3")
    a = (tmp_path / "a" / "train" / "shard-000000.tar").read_bytes()
    b = (tmp_path / "b" / "train" / "shard-000000.tar").read_bytes()
    assert tarfile.open(fileobj=io.BytesIO(a)).getnames() == tarfile.open(fileobj=io.BytesIO(b)).getnames()
    ta = tarfile.open(fileobj=io.BytesIO(a))
    tb = tarfile.open(fileobj=io.BytesIO(b))
    for m in ta.getmembers():
        assert ta.extractfile(m).read() == tb.extractfile(m.name).read()


def test_train_tokenizer_reports_special_ids(synthetic):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(synthetic / "spm.model"))
    assert sp.bos_id() >= 0 and sp.eos_id() >= 0 and sp.pad_id() >= 0
    assert sp.encode("red circle", out_type=str) == ["▁red", "▁circle"]


def test_bench_resume_reads_as_much_after_many_samples_as_after_few(tmp_path, synthetic):
    out = tmp_path / "resume.json"
    proc = run_tool("bench_resume.py", "--seen", "100", "3000", "--shard-count", "4",
                    "--shard-size", "50", "--shuffle-buffer", "40", "--batch", "8",
                    "--tokenizer", str(synthetic / "spm.model"), "--json", str(out))
    rows = json.loads(out.read_text())
    assert [r["seen"] for r in rows] == [100, 3000] and all(r["continued"] for r in rows)
    # At most the block, the next block's samples read ahead, the first shard's skipped part
    # and the batch: the same bound after 3000 samples as after 100.
    assert all(r["samples_read"] <= 2 * 40 + 50 + 8 for r in rows), rows
    assert "samples read before the first batch" in proc.stdout


def test_bench_data_compares_megaclip_and_open_clip(tmp_path):
    out = tmp_path / "data.json"
    proc = run_tool("bench_data.py", "--workers", "1", "--repeats", "1", "--batches", "2",
                    "--skip", "1", "--batch", "4", "--image-size", "32", "--image-side", "48",
                    "--shard-count", "1", "--shard-size", "40", "--device", "cpu",
                    "--json", str(out))
    figures = json.loads(out.read_text())
    assert [r["system"] for r in figures["runs"]] == ["megaclip", "open_clip"]
    assert all(r["samples_per_s"] > 0 for r in figures["runs"])
    assert "megaclip/open_clip@1" in figures["ratios"] and "megaclip / open_clip" in proc.stdout
    bad = run_tool("bench_data.py", "--set", "jpeg_drat=false", check=False)
    assert bad.returncode == 2 and "data.jpeg_drat" in bad.stderr


@pytest.mark.parametrize("args,message", [
    (["no/such/run"], "neither a complete checkpoint nor a run"),
    (["--formats", "onnx"], "--formats: unknown ['onnx']"),
])
def test_convert_checkpoint_bad_input_exits_2(tmp_path, args, message):
    path = [] if args[0].startswith("--") else [args.pop(0)]
    proc = run_tool("convert_checkpoint.py", *(path or [str(tmp_path)]), "--out",
                    str(tmp_path / "out"), *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def _image_tree(root, classes=("golden_retriever", "tabby-cat"), per_class=5, masks=None):
    for c, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (20 + i, 16), (40 * c, 30 * i, 90))
            img.save(root / name / f"{i}.{'jpg' if i % 2 else 'png'}")
            if masks is not None:
                os.makedirs(masks / name, exist_ok=True)
                mask = np.zeros((16, 20 + i), dtype=np.int64)
                mask[4:10, 5:12] = c + 1
                np.save(masks / name / f"{i}.npy", mask)


def test_make_eval_set_from_an_image_folder_with_masks(tmp_path):
    from megaclip.data.eval_set import EvalSet
    from megaclip.data.shards import iter_shard
    _image_tree(tmp_path / "images", masks=tmp_path / "masks")
    proc = run_tool("make_eval_set.py", "--images", str(tmp_path / "images"), "--out",
                    str(tmp_path / "out"), "--splits", "train=0.6,test=0.4", "--masks",
                    str(tmp_path / "masks"))
    assert "train: 6 images" in proc.stdout and "test: 4 images" in proc.stdout
    meta = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert meta["classnames"] == ["golden retriever", "tabby cat"] and len(meta["templates"]) == 7
    test = EvalSet(str(tmp_path / "out" / "test" / "shard-000000.tar"),
                   str(tmp_path / "out" / "classes.json"), 16, (0.5,) * 3, (0.5,) * 3)
    assert sorted(test.labels.tolist()) == [0, 0, 1, 1]  # both classes in every split
    assert test.images([0, 1]).shape == (2, 3, 16, 16)
    sample = next(iter_shard(str(tmp_path / "out" / "test" / "shard-000000.tar")))
    mask = np.load(io.BytesIO(sample["mask.npy"]))
    assert mask.shape[0] == 16 and set(np.unique(mask)) <= {0, 1, 2}


def test_make_eval_set_from_a_labels_csv(tmp_path):
    _image_tree(tmp_path / "photos", classes=("a", "b", "c"), per_class=2)
    rows = [("path", "class")] + [(f"{c}/{i}.{'jpg' if i % 2 else 'png'}", f"label {c}")
                                   for c in "abc" for i in range(2)]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    (tmp_path / "t.txt").write_text("a picture of {}.\n{} seen from above\n")
    proc = run_tool("make_eval_set.py", "--csv", str(tmp_path / "labels.csv"), "--root",
                    str(tmp_path / "photos"), "--templates", str(tmp_path / "t.txt"), "--out",
                    str(tmp_path / "out"))
    assert "test: 6 images" in proc.stdout
    meta = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert meta == {"classnames": ["label a", "label b", "label c"],
                    "templates": ["a picture of {}.", "{} seen from above"]}


@pytest.mark.parametrize("args,message", [
    (["--images", "nowhere"], "image folder 'nowhere' does not exist"),
    (["--images", "IMAGES", "--splits", "train=x"], "expected NAME=FRACTION"),
    (["--images", "IMAGES", "--masks", "EMPTY"], "no mask for"),
    (["--images", "IMAGES", "--masks", "IMAGES"], "its image is 16x20 (h x w)"),  # RGB "masks"
    (["--images", "IMAGES", "--masks", "BADMASKS"], "labels are 0 (background), 1..2"),
    (["--csv", "EMPTYCSV"], "no rows under the header"),
    (["--images", "IMAGES", "--out-again"], "the folder is not empty"),
])
def test_make_eval_set_bad_input_exits_2(tmp_path, args, message):
    _image_tree(tmp_path / "images", per_class=1, masks=tmp_path / "badmasks")
    np.save(tmp_path / "badmasks" / "tabby-cat" / "0.npy", np.full((16, 20), 7))  # no class 6
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty.csv").write_text("image,label\n")
    places = {"IMAGES": str(tmp_path / "images"), "EMPTY": str(tmp_path / "empty"),
              "BADMASKS": str(tmp_path / "badmasks"), "EMPTYCSV": str(tmp_path / "empty.csv")}
    if "--out-again" in args:
        args.remove("--out-again")
        run_tool("make_eval_set.py", "--images", places["IMAGES"], "--out", str(tmp_path / "out"))
    args = [places.get(a, a) for a in args]
    proc = run_tool("make_eval_set.py", *args, "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_fuzz_shards_runs_for_its_budget_and_finds_no_crash(tmp_path):
    proc = run_tool("fuzz_shards.py", "--seconds", "3", "--json", str(tmp_path / "f.json"))
    assert "crashes 0" in proc.stdout
    import json
    figures = json.loads((tmp_path / "f.json").read_text())
    assert figures["inputs"] > 10 and figures["crashes"] == 0 and figures["bad_shards"] > 0
