"""The step guard's rules without a training run: a non-finite loss always yields non-finite
gradients (so DeepSpeed discards the step), skips are counted and K in a row end the run, and
the guard's state survives a checkpoint."""
import pytest
import torch

from megaclip.engine.guard import StepGuard
from megaclip.engine.step import poison_if_not_finite
from megaclip.errors import FatalError


@pytest.mark.parametrize("offset", [float("inf"), float("nan"), -float("inf")])
def test_a_non_finite_loss_with_finite_gradients_gets_non_finite_gradients(offset):
    w = torch.ones(3, requires_grad=True)
    # An infinite term that does not depend on the parameters: its gradients alone are finite.
    loss = (w * 2).sum() + torch.tensor(offset)
    poison_if_not_finite(loss).backward()
    assert not torch.isfinite(w.grad).any()


def test_a_finite_loss_is_left_as_it_is():
    w = torch.ones(3, requires_grad=True)
    loss = poison_if_not_finite((w * 2).sum())
    loss.backward()
    assert loss.item() == 6.0 and torch.equal(w.grad, torch.full((3,), 2.0))


def test_skips_are_counted_and_k_in_a_row_stop_keeping_the_last_good_checkpoint():
    guard = StepGuard(max_in_a_row=3)
    assert guard.judge(1, True, {"clip": 0.0, "loss": 0.0}, lambda: "step00000001") is None
    line = guard.judge(2, False, {"clip": 1.0, "loss": 1.0}, lambda: "step00000001")
    assert line.startswith("step 2 skipped on every rank: non-finite clip on 1 rank(s)")
    assert guard.protected == ("step00000001",)
    # Saved and restored between two skipped steps: the count in a row goes on.
    guard = StepGuard.from_state(3, guard.state_dict())
    guard.judge(3, False, {"clip": 0.0, "loss": 0.0}, lambda: "step00000003")  # the norm
    assert guard.protected == ("step00000001",) and guard.skipped == 2
    with pytest.raises(FatalError, match=r"3 steps in a row were not finite \(up to step 4; .*"
                                         r"the last good checkpoint is kept: step00000001"):
        guard.judge(4, False, {"clip": 2.0, "loss": 2.0}, lambda: "step00000004")


def test_a_step_applied_despite_a_non_finite_loss_is_fatal():
    with pytest.raises(FatalError, match="applied although loss was not finite"):
        StepGuard(10).judge(5, True, {"loss": 1.0}, lambda: None)
