"""Every DG-Net++ loss term as a pure function of tensors; the weights live in the config.

GAN terms are computed in fp32 (inputs cast with `.float()`) so that bf16 autocast stays stable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum")


def recon_l1(x: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error with the target detached (`recon_x`, `recon_xp`, `recon_s`, `recon_f`, `L_cyc`).

    `x` and `target` have the same shape, e.g. `(B, 3, H, W)`; returns a scalar.
    """
    if x.shape != target.shape:
        raise ValueError(f"recon_l1: shapes differ ({tuple(x.shape)} vs target {tuple(target.shape)})")
    return (x - target.detach()).abs().mean()


def id_loss(logits: Tensor, labels: Tensor, ignore_index: int = -1) -> Tensor:
    """Cross entropy over the labelled samples (`L_id^{s1}`, `L_id^{t1}`, `L_id^{s2}`, `L_id^{t2}`).

    `logits (B, N)`, `labels (B,)` where `ignore_index` marks unlabelled samples. Returns the mean over
    labelled samples, or a graph-connected zero when none is labelled (no host sync, no NaN).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"id_loss: expected logits (B, N) and labels (B,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    per_sample = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    count = (labels != ignore_index).sum().clamp(min=1)
    return per_sample.sum() / count


def _check_scales(fake_outs: Sequence[Tensor], real_outs: Sequence[Tensor]) -> None:
    if len(fake_outs) != len(real_outs) or not fake_outs:
        raise ValueError(
            f"expected the same non-zero number of discriminator scales, got {len(fake_outs)} fake and "
            f"{len(real_outs)} real"
        )


def lsgan_d_loss(fake_outs: Sequence[Tensor], real_outs: Sequence[Tensor]) -> Tensor:
    """Image discriminator LSGAN loss (`L_adv^{img}`, D side; official `calc_dis_loss`).

    Sum over scales of mean(D(fake)^2) + mean((D(real) - 1)^2); each map is `(B, 1, h_s, w_s)`.
    """
    _check_scales(fake_outs, real_outs)
    loss = fake_outs[0].new_zeros((), dtype=torch.float32)
    for fake, real in zip(fake_outs, real_outs, strict=True):
        loss = loss + fake.float().pow(2).mean() + (real.float() - 1).pow(2).mean()
    return loss


def r1_penalty(real_outs: Sequence[Tensor], real: Tensor) -> Tensor:
    """R1 regulariser on real images (official `compute_grad2`), before its weight (lambda 0.01 in config).

    Sum over scales of mean over the batch of ||d sum(D_s(real)) / d real||^2, for `real (B, 3, H, W)`
    that requires grad. Uses `create_graph=True`, so backward through it costs a second (double) backward
    pass through D for every scale.
    """
    if not real.requires_grad:
        raise ValueError("r1_penalty: call real.requires_grad_(True) before running the discriminator on it")
    if not real_outs:
        raise ValueError("r1_penalty: no discriminator outputs given")
    loss = real.new_zeros((), dtype=torch.float32)
    for out in real_outs:
        (grad,) = torch.autograd.grad(out.float().sum(), real, create_graph=True, retain_graph=True)
        loss = loss + grad.float().pow(2).reshape(grad.shape[0], -1).sum(1).mean()
    return loss


def lsgan_g_loss(fake_outs: Sequence[Tensor], scale: float = 2.0) -> Tensor:
    """Image generator LSGAN loss (`L_adv^{img}`, G side): `scale` * sum over scales of mean((D(fake)-1)^2).

    The official code uses `scale=2`.
    """
    if not fake_outs:
        raise ValueError("lsgan_g_loss: no discriminator outputs given")
    loss = fake_outs[0].new_zeros((), dtype=torch.float32)
    for fake in fake_outs:
        loss = loss + (fake.float() - 1).pow(2).mean()
    return scale * loss


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; use one of {REDUCTIONS}")
    return values.sum() if reduction == "sum" else values.mean()


def domain_lsgan(scores: Tensor, label: float, reduction: str = "sum") -> Tensor:
    """LSGAN term of the domain discriminator towards one domain label: reduce((D - label)^2) over `(B,)`."""
    if scores.dim() != 1:
        raise ValueError(f"domain losses expect scores of shape (B,), got {tuple(scores.shape)}")
    return _reduce((scores.float() - label).pow(2), reduction)


def domain_d_loss(d_source: Tensor, d_target: Tensor, reduction: str = "sum") -> Tensor:
    """Domain discriminator loss (`L_adv^{dom}`, D side): source label 0, target label 1.

    `reduce(D(v_s)^2) + reduce((D(v_t) - 1)^2)` over the batch `(B,)`; the official reduction is "sum".
    """
    return domain_lsgan(d_source, 0.0, reduction) + domain_lsgan(d_target, 1.0, reduction)


def domain_g_loss(d_target: Tensor, reduction: str = "sum", scale: float = 2.0) -> Tensor:
    """Domain adversarial loss on the encoder (`L_adv^{dom}`, official `loss_gen_id_adv`).

    `scale * reduce(D(v_t)^2)` over `(B,)`: pushes target features to the source label 0 (official scale 2).
    """
    return scale * domain_lsgan(d_target, 0.0, reduction)


def teacher_soft_label(logits: Tensor, flipped_logits: Tensor) -> Tensor:
    """The teacher's soft label (official `predict_label`, `teacher_style 0`): the mean of softmax(T(x)) and
    softmax(T(flip x)), renormalised to sum to 1.

    `logits`, `flipped_logits` `(B, K)` (the teacher's outputs on the images and their mirror images) -> `(B, K)`.
    """
    if logits.dim() != 2 or logits.shape != flipped_logits.shape:
        raise ValueError(
            f"teacher_soft_label: expected two (B, K) logits of one shape, got {tuple(logits.shape)} and "
            f"{tuple(flipped_logits.shape)}"
        )
    mean = (F.softmax(logits.float(), dim=1) + F.softmax(flipped_logits.float(), dim=1)) / 2
    return mean / mean.sum(dim=1, keepdim=True)


def teacher_kl(student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
    """Teacher KL(teacher || softmax(student)) (`L_prim` of DG-Net, official `loss_teacher`: `KLDivLoss(sum) / B`).

    `student_logits (B, N)`; `teacher_probs (B, K)` with K <= N covers the first K (source) classes and is
    zero-padded to N, as in the official code.
    """
    if student_logits.dim() != 2 or teacher_probs.dim() != 2 or teacher_probs.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"teacher_kl: expected (B, N) logits and (B, K) probabilities, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_probs.shape)}"
        )
    extra = student_logits.shape[1] - teacher_probs.shape[1]
    if extra < 0:
        raise ValueError(
            f"teacher_kl: the teacher has {teacher_probs.shape[1]} classes, more than the student's "
            f"{student_logits.shape[1]}"
        )
    target = F.pad(teacher_probs.detach().float(), (0, extra))
    log_probs = F.log_softmax(student_logits.float(), dim=1)
    return F.kl_div(log_probs, target, reduction="sum") / student_logits.shape[0]
