"""Loss terms on numbers small enough to check by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dgnetpp_pl.losses import (
    domain_d_loss,
    domain_g_loss,
    domain_lsgan,
    id_loss,
    lsgan_d_loss,
    lsgan_g_loss,
    r1_penalty,
    recon_l1,
    teacher_kl,
    teacher_soft_label,
)


def test_recon_l1_value_and_detached_target():
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    target = torch.tensor([2.0, 2.0, 5.0], requires_grad=True)
    loss = recon_l1(x, target)
    assert loss.item() == pytest.approx(1.0)  # (1 + 0 + 2) / 3
    loss.backward()
    assert target.grad is None
    torch.testing.assert_close(x.grad, torch.tensor([-1.0, 0.0, -1.0]) / 3)
    with pytest.raises(ValueError, match="shapes differ"):
        recon_l1(x, target[:2])


def test_id_loss_ignores_unlabelled_samples():
    logits = torch.tensor([[math.log(3.0), 0.0], [100.0, -100.0], [0.0, 0.0]])
    labels = torch.tensor([0, -1, 1])
    # mean of -log(3/4) and -log(1/2) over the two labelled rows; the ignored row would be huge.
    expected = (math.log(4 / 3) + math.log(2)) / 2
    assert id_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert id_loss(logits, torch.tensor([0, 1, 1]), ignore_index=1).item() == pytest.approx(math.log(4 / 3))


def test_id_loss_all_ignored_is_zero_and_differentiable():
    logits = torch.randn(4, 5, requires_grad=True)
    loss = id_loss(logits, torch.full((4,), -1))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_lsgan_d_loss_on_constant_maps():
    fake = [torch.full((2, 1, 8, 4), 0.5), torch.full((2, 1, 4, 2), 0.5)]
    real = [torch.full((2, 1, 8, 4), 0.25), torch.full((2, 1, 4, 2), 0.25)]
    # per scale: 0.5^2 + (0.25 - 1)^2 = 0.8125
    assert lsgan_d_loss(fake, real).item() == pytest.approx(2 * 0.8125)
    with pytest.raises(ValueError, match="same non-zero number"):
        lsgan_d_loss(fake, real[:1])


def test_lsgan_g_loss_scale_and_fp32():
    fake = [torch.full((2, 1, 8, 4), 0.5, dtype=torch.bfloat16) for _ in range(3)]
    loss = lsgan_g_loss(fake)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2.0 * 3 * 0.25)
    assert lsgan_g_loss(fake, scale=1.0).item() == pytest.approx(0.75)


def test_domain_losses_sum_versus_mean():
    d_s = torch.tensor([1.0, 2.0])
    d_t = torch.tensor([0.0, 1.0])
    assert domain_d_loss(d_s, d_t).item() == pytest.approx((1 + 4) + (1 + 0))
    assert domain_d_loss(d_s, d_t, reduction="mean").item() == pytest.approx(2.5 + 0.5)
    assert domain_g_loss(d_s).item() == pytest.approx(2.0 * 5)
    assert domain_g_loss(d_s, reduction="mean", scale=1.0).item() == pytest.approx(2.5)
    assert domain_lsgan(d_s, 1.0, "sum").item() == pytest.approx(0 + 1)
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        domain_d_loss(d_s, d_t, reduction="max")
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        domain_g_loss(d_s[:, None])


def test_r1_penalty_on_linear_discriminator():
    w = torch.tensor(1.5, requires_grad=True)
    real = torch.randn(2, 3, 4, 2, requires_grad=True)
    c, h, wd = 3, 4, 2
    scale1 = w * real.sum(dim=1, keepdim=True)  # d sum / d real = w everywhere
    scale2 = 3.0 * real[:, :1].mean(dim=(2, 3), keepdim=True)  # 3/(h*wd) on channel 0
    penalty = r1_penalty([scale1, scale2], real)
    expected = 1.5**2 * c * h * wd + 9.0 / (h * wd)
    assert penalty.item() == pytest.approx(expected, rel=1e-5)
    # create_graph: the penalty is differentiable w.r.t. the discriminator's weight.
    penalty.backward()
    assert w.grad.item() == pytest.approx(2 * 1.5 * c * h * wd, rel=1e-5)


def test_r1_penalty_needs_grad_on_real():
    real = torch.randn(2, 3, 4, 2)
    with pytest.raises(ValueError, match="requires_grad_"):
        r1_penalty([real.sum(dim=1)], real)


def test_teacher_kl_by_hand():
    student = torch.zeros(2, 2, requires_grad=True)  # softmax = (1/2, 1/2)
    sure = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert teacher_kl(student, sure).item() == pytest.approx(math.log(2))
    assert teacher_kl(student, torch.full((2, 2), 0.5)).item() == pytest.approx(0.0, abs=1e-7)
    # A teacher over the first class only is zero-padded to the student's classes.
    assert teacher_kl(student, torch.ones(2, 1)).item() == pytest.approx(math.log(2))
    teacher_kl(student, sure).backward()
    torch.testing.assert_close(student.grad, torch.tensor([[-0.5, 0.5], [-0.5, 0.5]]) / 2)
    with pytest.raises(ValueError, match="more than the student"):
        teacher_kl(student, torch.full((2, 3), 1 / 3))


def test_teacher_soft_label_averages_both_views_and_renormalises():
    # softmax([0, ln 3]) = (1/4, 3/4); the mirror image gives (3/4, 1/4); their mean is (1/2, 1/2).
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    flipped = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    soft = teacher_soft_label(logits, flipped)
    torch.testing.assert_close(soft, torch.tensor([[0.5, 0.5], [0.375, 0.625]]))
    torch.testing.assert_close(soft.sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="one shape"):
        teacher_soft_label(logits, flipped[:, :1])


def test_teacher_kl_pads_the_source_label_over_active_target_classes():
    """Student over 2 source + 2 target classes, teacher over the 2 source ones: the target entries get probability
    0 in the target distribution but still take mass from the student."""
    soft = torch.tensor([[0.5, 0.5]])
    # All four classes active, uniform student: KL = sum 0.5 * ln(0.5 / 0.25) = ln 2.
    assert teacher_kl(torch.zeros(1, 4), soft).item() == pytest.approx(math.log(2))
    # Student mass on target classes costs: logits (0, 0, ln 2, ln 2) give q = (1/6, 1/6, 1/3, 1/3),
    # KL = 2 * 0.5 * ln(0.5 / (1/6)) = ln 3.
    student = torch.tensor([[0.0, 0.0, math.log(2.0), math.log(2.0)]], requires_grad=True)
    assert teacher_kl(student, soft).item() == pytest.approx(math.log(3))
    # d KL / d logits = q - p (p zero-padded): (1/6 - 1/2, 1/6 - 1/2, 1/3, 1/3).
    teacher_kl(student, soft).backward()
    torch.testing.assert_close(student.grad, torch.tensor([[-1 / 3, -1 / 3, 1 / 3, 1 / 3]]))
    # Target classes not yet in use are masked out of the student (mask_logits): back to a 2-class KL, here 0.
    from dgnetpp_pl.objective import mask_logits

    assert teacher_kl(mask_logits(torch.zeros(1, 4), 2), soft).item() == pytest.approx(0.0, abs=1e-6)
