"""Held-out results of finished runs, grouped and summarised (mean and spread over seeds).

Pure functions over the ``eval_stepNNNNNNNN.json`` and ``metrics.jsonl`` files the trainer
writes into its output directory; ``tools/compare_runs.py`` and ``tools/gpu_check.py`` are the
command lines around them.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import statistics

from megaclip.errors import UserError

_EVAL = re.compile(r"eval_step(\d+)\.json$")
log = logging.getLogger("megaclip")


def latest_eval(run_dir: str) -> dict:
    """The evaluation with the highest step in ``run_dir`` (``step`` included)."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "eval_step*.json")):
        m = _EVAL.search(path)
        if m:
            found.append((int(m.group(1)), path))
    if not found:
        raise UserError(f"{run_dir}: no eval_step*.json "
                        "(unfinished, or trained without eval.shards)")
    step, path = max(found)
    with open(path) as f:
        result = json.load(f)
    result.setdefault("step", step)
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(groups: dict[str, list[dict]], metrics: list[str]) -> dict[str, dict]:
    """For each group: ``n``, the steps its runs ended at, and (mean, std) of every metric."""
    out = {}
    for name, results in groups.items():
        missing = [m for m in metrics for r in results if m not in r]
        if missing:
            raise UserError(f"group {name}: metric {missing[0]!r} is not in every result")
        out[name] = {"n": len(results), "steps": sorted({int(r["step"]) for r in results}),
                     **{m: mean_std([float(r[m]) for r in results]) for m in metrics}}
    return out


# --------------------------------------------------------------------------- training logs
LOSS_KEYS = ("loss", "clip", "siglip", "distill", "mlm")


def read_metrics(run_dir: str) -> list[dict]:
    """The training log lines (``train/`` values) of ``<run_dir>/metrics.jsonl``, in order."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir}: no metrics.jsonl (the run did not reach its first log step)")
    rows = []
    with open(path) as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            # A run killed while writing leaves its last line cut (a resume appends after it).
            log.warning("%s: line %d is not a whole JSON record (a write cut short?); skipped",
                        path, number)
            continue
        rows.append(row)
    return [{k.removeprefix("train/"): v for k, v in r.items()} for r in rows
            if any(k.startswith("train/") for k in r)]


def judge_training(rows: list[dict], needs_teacher: bool) -> tuple[list[str], dict]:
    """(problems, figures) of a short training run: every logged loss term finite, the total
    loss lower at the last log than at the first, the EMA teacher moving (when there is one).
    Figures are the last log line's throughput and memory (the first interval holds warm-up)."""
    if len(rows) < 2:
        return [f"{len(rows)} log line(s): need at least 2 to see the loss fall"], {}
    problems = []
    for r in rows:
        bad = [k for k in LOSS_KEYS if k in r and not math.isfinite(r[k])]
        if bad:
            problems.append(f"step {r['step']}: {', '.join(bad)} not finite")
    if not rows[-1]["loss"] < rows[0]["loss"]:
        problems.append(f"loss did not fall: {rows[0]['loss']:.4f} at step {rows[0]['step']}, "
                        f"{rows[-1]['loss']:.4f} at step {rows[-1]['step']}")
    if needs_teacher and not all(r.get("teacher_update_rms", 0) > 0 for r in rows):
        problems.append("the EMA teacher did not move (teacher_update_rms is 0 or missing)")
    last = rows[-1]
    figures = {k: last[k] for k in ("samples_per_s", "step_time_s", "data_time_s",
                                    "tflops_per_device", "mfu", "peak_mem_gib",
                                    "peak_reserved_gib") if k in last}
    figures["loss_first"], figures["loss_last"] = rows[0]["loss"], last["loss"]
    return problems, figures
