"""Seed summaries of finished runs: the last evaluation of each run, mean and sample std."""
import json

import pytest

from megaclip.errors import UserError
from megaclip.reports import latest_eval, mean_std, summarise
from tests.conftest import run_tool


def _run(tmp_path, name, evals):
    d = tmp_path / name
    d.mkdir()
    for step, top1 in evals:
        (d / f"eval_step{step:08d}.json").write_text(
            json.dumps({"step": step, "zeroshot_top1": top1, "i2t_R@1": top1 / 2}))
    return d


def test_latest_eval_takes_the_highest_step(tmp_path):
    d = _run(tmp_path, "r", [(100, 0.1), (400, 0.4), (50, 0.9)])
    assert latest_eval(str(d))["zeroshot_top1"] == 0.4


def test_latest_eval_without_results_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no eval_step"):
        latest_eval(str(tmp_path / "empty"))


def test_mean_and_sample_std():
    assert mean_std([0.2, 0.4, 0.6]) == pytest.approx((0.4, 0.2))
    assert mean_std([0.3]) == (0.3, 0.0)


def test_summarise_groups_and_rejects_missing_metrics():
    groups = {"a": [{"step": 4, "m": 1.0}, {"step": 4, "m": 3.0}], "b": [{"step": 4, "m": 2.0}]}
    s = summarise(groups, ["m"])
    assert s["a"]["n"] == 2 and s["a"]["m"] == pytest.approx((2.0, 2 ** 0.5))
    assert s["b"]["steps"] == [4]
    with pytest.raises(UserError, match="'x'"):
        summarise(groups, ["x"])


def test_compare_runs_cli(tmp_path):
    for s, v in enumerate([0.2, 0.4, 0.6]):
        _run(tmp_path, f"clip_s{s}", [(400, v)])
    _run(tmp_path, "mask_s0", [(400, 0.5)])
    out = tmp_path / "summary.json"
    proc = run_tool("compare_runs.py", f"clip={tmp_path}/clip_s*", f"mask={tmp_path}/mask_s0",
                    "--metrics", "zeroshot_top1", "--json", str(out))
    assert "0.4000 ± 0.2000" in proc.stdout
    summary = json.loads(out.read_text())
    assert summary["clip"]["n"] == 3 and summary["mask"]["zeroshot_top1"] == [0.5, 0.0]
    bad = run_tool("compare_runs.py", "clip", check=False)
    assert bad.returncode == 2 and "NAME=RUN_DIR" in bad.stderr


def _rows(losses, teacher=(1e-4,)):
    return [{"step": 5 * (i + 1), "loss": v, "clip": v, "samples_per_s": 100.0,
             "tflops_per_device": 50.0, "peak_mem_gib": 3.0, "data_time_s": 0.01,
             **({"teacher_update_rms": teacher[min(i, len(teacher) - 1)]} if teacher else {})}
            for i, v in enumerate(losses)]


def test_judge_training_passes_a_falling_finite_run_and_reports_the_last_interval():
    from megaclip.reports import judge_training
    problems, fig = judge_training(_rows([4.0, 3.5, 3.0]), needs_teacher=True)
    assert problems == [] and fig["samples_per_s"] == 100.0
    assert fig["loss_first"] == 4.0 and fig["loss_last"] == 3.0


def test_judge_training_names_each_failure():
    from megaclip.reports import judge_training
    nan = judge_training(_rows([4.0, float("nan"), 3.0]), needs_teacher=False)[0]
    assert nan == ["step 10: loss, clip not finite"]
    flat = judge_training(_rows([4.0, 4.1]), needs_teacher=False)[0]
    assert flat and "loss did not fall" in flat[0]
    frozen = judge_training(_rows([4.0, 3.0], teacher=(1e-4, 0.0)), needs_teacher=True)[0]
    assert frozen == ["the EMA teacher did not move (teacher_update_rms is 0 or missing)"]
    assert "need at least 2" in judge_training(_rows([4.0]), needs_teacher=False)[0][0]
