"""megaclip/bench/sync_watch.py: the host synchronisations torch reports in sync-debug mode are
counted by the source line that caused them; other warnings pass through (faked on the CPU: the
mode itself needs a GPU)."""
import warnings

import torch

from megaclip.bench import sync_watch
from megaclip.bench.sync_watch import SyncWatch, describe


def test_synchronisations_are_counted_by_source_line(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    watch = SyncWatch()
    watch.enabled = True  # as on a GPU
    with warnings.catch_warnings(record=True) as passed:
        warnings.simplefilter("always")
        for _ in range(2):  # two steps
            with watch.watch():
                warnings.warn("called a synchronizing CUDA operation")  # line A, twice a step
                warnings.warn("called a synchronizing CUDA operation")
                warnings.warn("something else")
    assert modes == ["warn", "default"] * 2
    summary = watch.summary(steps=2)
    assert sum(s["count"] for s in summary) == 4 and len(summary) == 2
    assert all(s["per_step"] == 1.0 and s["where"].startswith(__file__) for s in summary)
    assert summary[0]["line"].startswith("warnings.warn(\"called a synchronizing")
    assert [str(w.message) for w in passed] == ["something else"] * 2
    assert "1.0/step" in describe(summary) and describe([]) == "  none seen"


def test_without_a_gpu_it_watches_nothing():
    if torch.cuda.is_available():
        return
    watch = SyncWatch()
    with watch.watch():
        pass
    assert not watch.enabled and watch.summary(3) == [] and sync_watch.describe([]) == "  none seen"
