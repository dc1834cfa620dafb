"""A checkpoint names the optimiser class whose state it holds; resuming with another is refused
before DeepSpeed loads a state it cannot use."""
import json

import pytest

from megaclip.checkpoint import MARKER, check_optimizer
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
