"""No micro-step of a step that does not log makes the host wait for the device: no scalar read
(``.item()``, ``.tolist()``, ``bool``/``float``/``int`` of a tensor), no ``nonzero`` or
boolean-mask index (data-dependent shapes), no ``torch.tensor(..., device=)`` of host data,
for every objective, through the real trainer (tests/engine/host_sync_steps.py)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megaclip.config import MaskConfig, TextMlmConfig
from megaclip.data.masks import Masking, batch_masks
from megaclip.engine.step import to_device
from tests.conftest import ROOT
from tests.engine.host_syncs import HostSyncs

OBJECTIVES = ("clip", "siglip", "maskclip", "maskclip_flip", "silc", "maskclip+silc")


def test_the_recorder_catches_each_kind_of_host_sync():
    x = torch.randn(6)
    cases = {
        "Tensor.item": lambda: x.sum().item(),
        "Tensor.tolist": lambda: x.tolist(),
        "Tensor.__bool__": lambda: bool((x > 0).any()),
        "Tensor.__float__": lambda: float(x.sum()),
        "Tensor.__int__": lambda: int(x.argmax()),
        "aten.nonzero": lambda: x.nonzero(),
        "indexing with a boolean mask": lambda: x[x > 0],
        "torch.tensor(..., device=) of host data": lambda: torch.tensor([0.5], device=x.device),
        "Tensor.cpu": lambda: x.cpu(),
        "aten.masked_select": lambda: x.masked_select(x > 0),
    }
    for what, fn in cases.items():
        with HostSyncs() as syncs:
            fn()
        assert what in {w for w, _ in syncs.events}, (what, syncs.events)
    with HostSyncs() as syncs:  # what the step does instead
        idx = torch.tensor([[0, 2]])
        x[None].gather(1, idx)
        torch.where(x > 0, x, 0.0).sum()
        torch.full((), 0.5, device=x.device)
        with syncs.pause():
            x.sum().item()
    assert syncs.events == []


def test_masks_reach_the_step_as_indices_drawn_by_the_pipeline():
    """The pipeline's batch carries the index lists, so ``to_device`` reads no mask value."""
    tokens = torch.tensor([[1, 5, 6, 7, 8, 2, 0], [1, 9, 2, 0, 0, 0, 0]])
    eot = torch.tensor([5, 2])
    masking = Masking(grid=4, image=MaskConfig(ratio=0.75), text=TextMlmConfig(mask_ratio=0.5))
    batch = {"images": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "tokens": tokens, "eot": eot,
             **batch_masks(masking, [3, 4], tokens, eot, np.arange(10, 20))}
    assert batch["keep_index"].shape == (2, 4) and batch["masked_index"].shape == (2, 12)
    assert batch["mlm_valid"].sum(1).tolist() == batch["mlm_target"].sum(1).tolist()
    with HostSyncs() as syncs:
        out = to_device(batch, torch.device("cpu"), torch.float32, (0.5,) * 3, (0.25,) * 3)
        to_device(batch, torch.device("cpu"), torch.float32, (0.5,) * 3, (0.25,) * 3)
    # The mean and std are copied to the device once, at the first batch, and never again.
    assert len(syncs.events) <= 2 and all("views.py" in where for _, where in syncs.events)
    chosen = out["mlm_index"][out["mlm_valid"]]
    assert chosen.tolist() == batch["mlm_target"].nonzero()[:, 1].tolist()


@pytest.mark.slow
def test_no_host_sync_in_the_micro_steps_of_every_objective(tmp_path, synthetic):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "tests/engine/host_sync_steps.py", str(synthetic),
                           str(tmp_path), str(report), ",".join(OBJECTIVES)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(report.read_text())
    for name in OBJECTIVES:
        assert results[name]["micro_steps"] == 4, name  # steps 2 and 3, two micro-steps each
        assert not results[name]["events"], f"{name}:\n{results[name]['summary']}"
