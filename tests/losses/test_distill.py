"""Masked self-distillation and MLM losses: masked patches only, centring, sharpening."""
import math

import pytest
import torch

from megaclip.config import MaskDistillConfig
from megaclip.losses.distill import MaskedDistillLoss, teacher_temperature
from megaclip.data.masks import mlm_indices
from megaclip.losses.mlm import MlmLoss

B, N, M, K = 3, 16, 12, 32


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, M, K, generator=g)
    teacher = torch.randn(B, N, K, generator=g)
    masked = torch.stack([torch.randperm(N, generator=g)[:M].sort().values for _ in range(B)])
    return student, teacher, masked


def _loss(student, teacher, masked, step=100):
    module = MaskedDistillLoss(MaskDistillConfig(prototypes=K), total_steps=100)
    return module(student, teacher, masked, step)


def test_visible_patches_do_not_change_the_loss():
    student, teacher, masked = _inputs()
    base = _loss(student, teacher, masked)[0]["distill"]
    visible = torch.ones(B, N, dtype=torch.bool)
    visible[torch.arange(B)[:, None], masked] = False
    noisy = teacher.clone()
    noisy[visible] += 5 * torch.randn(int(visible.sum()), K)
    assert torch.equal(_loss(student, noisy, masked)[0]["distill"], base)
    changed = teacher.clone()
    changed[0, masked[0, 0]] += 5 * torch.randn(K)
    assert not torch.allclose(_loss(student, changed, masked)[0]["distill"], base)


def test_loss_is_cross_entropy_from_sharpened_teacher_to_student():
    student, teacher, masked = _inputs(1)
    terms, stats = _loss(student, teacher, masked)
    cfg = MaskDistillConfig(prototypes=K)
    t = torch.stack([teacher[b, masked[b]] for b in range(B)])
    q = torch.softmax(t / cfg.teacher_temp, -1)  # centre is zero at the first call
    expected = -(q * torch.log_softmax(student / cfg.student_temp, -1)).sum(-1).mean()
    assert torch.allclose(terms["distill"], expected, rtol=1e-6)
    entropy = -(q * q.log()).sum(-1).mean()
    assert torch.allclose(stats["teacher_entropy"], entropy, rtol=1e-5)
    assert 0 < stats["teacher_entropy"] < math.log(K)


def test_gradient_reaches_the_student_only():
    student, teacher, masked = _inputs(2)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    _loss(student, teacher, masked)[0]["distill"].backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


def test_centre_moves_once_per_optimiser_step_and_not_on_a_skipped_one():
    student, teacher, masked = _inputs(3)
    other = teacher.flip(0) * 2  # a second micro-batch of the same step
    module = MaskedDistillLoss(MaskDistillConfig(prototypes=K, center_momentum=0.9), 100)
    module(student, teacher, masked, 50)
    assert torch.equal(module.centering.center, torch.zeros_like(module.centering.center))  # not per micro-batch
    module(student, other, masked, 50)
    module.end_step(applied=True)
    step_mean = torch.cat([teacher, other]).mean(dim=(0, 1))
    assert torch.allclose(module.centering.center.flatten(), 0.1 * step_mean, atol=1e-6)
    module(student, teacher, masked, 51)
    module.end_step(applied=False)  # a skipped step leaves the centre as it was
    assert torch.allclose(module.centering.center.flatten(), 0.1 * step_mean, atol=1e-6)
    module(student, teacher, masked, 52)
    module.end_step(applied=True)
    expected = 0.9 * 0.1 * step_mean + 0.1 * teacher.mean(dim=(0, 1))
    assert torch.allclose(module.centering.center.flatten(), expected, atol=1e-6)


def test_teacher_temperature_warms_up_linearly():
    cfg = MaskDistillConfig(teacher_temp_warmup=0.04, teacher_temp=0.07,
                            teacher_temp_warmup_fraction=0.3)
    assert teacher_temperature(cfg, 0, 1000) == pytest.approx(0.04)
    assert teacher_temperature(cfg, 150, 1000) == pytest.approx(0.055)
    assert teacher_temperature(cfg, 300, 1000) == pytest.approx(0.07)
    assert teacher_temperature(cfg, 999, 1000) == pytest.approx(0.07)


def test_mlm_loss_reads_the_chosen_positions_only():
    tokens = torch.tensor([[2, 10, 11, 12, 3], [2, 20, 21, 3, 0]])
    target = torch.tensor([[False, True, False, True, False], [False, False, True, False, False]])
    index, valid = mlm_indices(target)  # (2, 2): row 1 has one chosen position and padding
    logits = torch.full((2, 2, 30), -10.0)
    logits[0, 0, 10], logits[0, 1, 12], logits[1, 0, 21] = 10.0, 10.0, 10.0  # right answers
    logits[1, 1, 5] = 10.0  # padding, wrong for position 0: must not count
    assert MlmLoss()(logits, tokens, index, valid)["mlm"] < 1e-6
    logits[0, 1, 12], logits[0, 1, 13] = -10.0, 10.0
    assert MlmLoss()(logits, tokens, index, valid)["mlm"] > 1.0


def test_a_checkpoint_from_before_the_centring_module_still_loads():
    """Objective states saved before ``Centering`` held ``distill.center`` shaped (1, 1, K)."""
    from megaclip.config import ObjectiveConfig
    from megaclip.objectives.loss import ObjectiveLoss as Objective
    cfg = ObjectiveConfig(mask_distill=MaskDistillConfig(weight=0.05, prototypes=K))
    objective = Objective(cfg, 100)
    old = torch.arange(K, dtype=torch.float32).reshape(1, 1, K)
    objective.load_state_dict({"distill.center": old})
    assert torch.equal(objective.distill.centering.center, old.flatten())
