"""Host synchronisations during measured steps: ``torch.cuda.set_sync_debug_mode("warn")`` around
the code under watch, its warnings captured and counted by the line of Python that caused them.
A figure printer's helper; does nothing without a GPU."""
from __future__ import annotations

import contextlib
import linecache
import warnings
from collections import Counter

import torch


class SyncWatch:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled and torch.cuda.is_available()
        self.seen: Counter = Counter()

    @contextlib.contextmanager
    def watch(self):
        """Count the host synchronisations of the block (the caller's own explicit
        ``torch.cuda.synchronize`` belongs outside it)."""
        if not self.enabled:
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for w in caught:
            text = str(w.message)
            if "synchroniz" not in text:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                continue
            self.seen[(w.filename, w.lineno, text.splitlines()[0][:120])] += 1

    def summary(self, steps: int) -> list[dict]:
        """Each source line that synchronised, most frequent first, with counts per step."""
        out = []
        for (filename, lineno, what), n in self.seen.most_common():
            out.append({"where": f"{filename}:{lineno}", "count": n, "per_step": n / max(steps, 1),
                        "line": linecache.getline(filename, lineno).strip(), "what": what})
        return out


def describe(summary: list[dict], limit: int = 12) -> str:
    """Lines for a report: ``  3.0/step  file.py:12  x.item()  (warning text)``."""
    if not summary:
        return "  none seen"
    lines = [f"  {s['per_step']:5.1f}/step  {s['where']}  {s['line']}" for s in summary[:limit]]
    if len(summary) > limit:
        lines.append(f"  ... and {len(summary) - limit} more source lines")
    return "\n".join(lines)
