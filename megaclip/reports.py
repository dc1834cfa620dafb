"""Held-out results of finished runs, grouped and summarised (mean and spread over seeds).

Pure functions over the ``eval_stepNNNNNNNN.json`` files the trainer writes into its output
directory; ``tools/compare_runs.py`` is the command line around them.
"""
from __future__ import annotations

import glob
import json
import os
import re
import statistics

from megaclip.errors import UserError

_EVAL = re.compile(r"eval_step(\d+)\.json$")


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
