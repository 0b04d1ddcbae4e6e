"""A straightforward DG-Net++ iteration, structured like the official trainer: the "before" path.

Every term is computed on its own: the D step re-runs the generator forward and detaches the fakes, the G step
calls the appearance encoder once per image group (x_a, x_b, xp_a, xp_b and their erased copies, and each detached
fake of the teacher terms), the teacher on each image and its mirror image, the decoders once per image,
deep-copies the appearance encoder (and, in the frozen branch, the structure encoders) to re-encode the fakes, and
calls the image discriminator once per (fake, real) pair. Each batch type is its own official function:
``gen_update_aa`` (DG-Net on two source halves with ``gen_a``), ``gen_update_ab`` and ``gen_update_bb`` (two target
halves with ``gen_b``), and the matching ``dis_update_*``; which terms a type has is written out here from the
official code, not taken from the optimised path's flags (only the batch type, whether target ids are on
(``flags.b_ids``, the official ``id_tgt``), whether the domain discriminator trains (``flags.steps_d_dom``, the
official ``id_adv_w > 0``), whether the teacher terms are on (``flags.teacher``) and the active classes are read from
them). Loss keys and weights match :func:`dgnetpp_pl.objective.generator_losses` and
:func:`dgnetpp_pl.objective.image_d_loss`, so the optimised path can be checked against this one term by term
(tests/test_equivalence.py) and timed against it
(bench/train_step.py). It shares the networks and the batch types with the optimised path, no loss or
forward code.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgnetpp_pl.data.transforms import random_erasing
from dgnetpp_pl.models.appearance import AppearanceEncoder, AppearanceOutput
from dgnetpp_pl.models.discriminators import DomainDiscriminator, MultiScaleImageDiscriminator
from dgnetpp_pl.models.generator import Generator
from dgnetpp_pl.models.structure import to_gray
from dgnetpp_pl.objective import PairBatch, StepFlags

Erase = Callable[[Tensor], Tensor]


@dataclass
class Nets:
    """The networks of one stage; ``gen_b`` is ``gen_a`` in the source stage (one generator for both)."""

    e_app: AppearanceEncoder
    gen_a: Generator
    gen_b: Generator
    d_img: MultiScaleImageDiscriminator
    d_dom: DomainDiscriminator | None

    @classmethod
    def from_module(cls, module: Any) -> Nets:
        """Take the networks of a :class:`dgnetpp_pl.module.DGNetPP`."""
        return cls(module.e_app, module.gen_a, module.gen_b_or_a, module.d_img, module.d_dom)


# --------------------------------------------------------------------------- loss terms, written out
def _l1(x: Tensor, target: Tensor) -> Tensor:
    return (x - target.detach()).abs().mean()


def _ce(logits: Tensor, labels: Tensor, num_active: int) -> Tensor:
    """Cross entropy over the first ``num_active`` classes and the labelled samples (label -1: none)."""
    if not bool((labels >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :num_active].float(), labels, ignore_index=-1)


def _dis_pair(d_img: MultiScaleImageDiscriminator, fake: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
    """One official ``calc_dis_loss`` call: LSGAN over scales and the R1 penalty of the real half."""
    # A fresh leaf: the official code marks the batch itself, so its G step also back-propagates into the
    # input images; that waste is not reproduced here (the "before" time is, if anything, optimistic).
    real = real.detach().requires_grad_(True)
    out_fake = d_img(fake)
    out_real = d_img(real)
    gan = fake.new_zeros(())
    r1 = fake.new_zeros(())
    for of, orr in zip(out_fake, out_real, strict=True):
        gan = gan + of.float().pow(2).mean() + (orr.float() - 1).pow(2).mean()
        (grad,) = torch.autograd.grad(orr.sum(), real, create_graph=True)
        r1 = r1 + grad.float().pow(2).flatten(1).sum(1).mean()
    return gan, r1


def _gen_adv(d_img: MultiScaleImageDiscriminator, fake: Tensor, scale: float) -> Tensor:
    return scale * sum((o.float() - 1).pow(2).mean() for o in d_img(fake))


def _reduce(v: Tensor, how: str) -> Tensor:
    return v.sum() if how == "sum" else v.mean()


def _teacher_label(teacher: nn.Module, x: Tensor, num_classes: int) -> Tensor:
    """Official ``predict_label`` (teacher_style 0): softmax of the image and of its mirror image, averaged,
    renormalised, then zero-padded to ``num_classes``."""
    with torch.no_grad():
        probs = F.softmax(teacher(x).float(), dim=1) + F.softmax(teacher(torch.flip(x, dims=[3])).float(), dim=1)
        probs = probs / 2
        probs = probs / probs.sum(dim=1, keepdim=True)
    zeros = probs.new_zeros(probs.shape[0], num_classes - probs.shape[1])
    return torch.cat([probs, zeros], dim=1)


def _teacher_kl(student_logits: Tensor, target: Tensor, num_active: int) -> Tensor:
    """``KLDivLoss(sum)(log_softmax(student), target) / B`` over the first ``num_active`` classes."""
    log_probs = F.log_softmax(student_logits[:, :num_active].float(), dim=1)
    return nn.KLDivLoss(reduction="sum")(log_probs, target[:, :num_active]) / student_logits.shape[0]


def _frozen_copy(module: nn.Module, stats: dict[str, float] | None) -> nn.Module:
    """Official per-step ``deepcopy``: weights frozen, dropout off, BatchNorm in the live module's mode."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    for m in twin.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    if stats is not None:
        stats["deep_copies"] = stats.get("deep_copies", 0) + 1
    return twin


def _generators(nets: Nets, batch_type: str) -> tuple[Generator, Generator]:
    """The official trainer's generators per type: aa uses gen_a twice, bb gen_b twice, ab one of each."""
    if batch_type == "aa":
        return nets.gen_a, nets.gen_a
    if batch_type == "bb":
        return nets.gen_b, nets.gen_b
    return nets.gen_a, nets.gen_b


# Domain discriminator targets of the two halves (official calc_dis_loss_aa / _ab / _bb): source 0, target 1.
_DOMAIN_TARGETS = {"aa": (0.0, 0.0), "ab": (0.0, 1.0), "bb": (1.0, 1.0)}


def _sync(x: Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


# --------------------------------------------------------------------------- the two steps
def reference_d_losses(
    nets: Nets,
    batch: PairBatch,
    flags: StepFlags,
    w: dict[str, Any],
) -> dict[str, Tensor]:
    """D step (official ``dis_update_aa / _ab / _bb``): re-run the generator forward, detach the fakes, D per
    (fake, real).

    Keys: ``d_img_gan``, ``d_img_r1``, ``d_img_total`` and, in the warm-up, ``d_dom``.
    """
    gen_a, gen_b = _generators(nets, flags.batch_type)
    s_a = gen_a.encode(batch.x_a)
    s_b = gen_b.encode(batch.x_b)
    out_a: AppearanceOutput = nets.e_app(batch.x_a)
    out_b: AppearanceOutput = nets.e_app(batch.x_b)
    x_ba = gen_b.decode(s_b, out_a.code)
    x_ab = gen_a.decode(s_a, out_b.code)
    gan_ba, r1_a = _dis_pair(nets.d_img, x_ba.detach(), batch.x_a)
    gan_ab, r1_b = _dis_pair(nets.d_img, x_ab.detach(), batch.x_b)
    out = {"d_img_gan": w["gan"] * (gan_ba + gan_ab)}
    if w["r1"] > 0:
        out["d_img_r1"] = w["gan"] * w["r1"] * (r1_a + r1_b)
    out["d_img_total"] = sum(out.values())
    if flags.steps_d_dom and nets.d_dom is not None:  # official: id_adv_w > 0 (round 0), every batch type
        red = w["domain_reduction"]
        label_a, label_b = _DOMAIN_TARGETS[flags.batch_type]
        d_a = nets.d_dom(out_a.feat.detach()).float()
        d_b = nets.d_dom(out_b.feat.detach()).float()
        out["d_dom"] = w["domain_adv"] * (_reduce((d_a - label_a).pow(2), red) + _reduce((d_b - label_b).pow(2), red))
    return out


def reference_g_losses(
    nets: Nets,
    batch: PairBatch,
    flags: StepFlags,
    w: dict[str, Any],
    *,
    erase: Erase | None = None,
    structure_detached: bool | None = None,
    generator: torch.Generator | None = None,
    stats: dict[str, float] | None = None,
    teacher: nn.Module | None = None,
) -> dict[str, Tensor]:
    """G step (official ``gen_update_aa / _ab / _bb``) with the same keys and weights as
    ``objective.generator_losses``.

    ``erase`` maps one image group ``(B, 3, H, W)`` to its erased copy (default: random erasing with
    ``w["erasing_p"]``); ``structure_detached`` picks the structure re-encoding branch (default: a coin with
    ``w["structure_detach_p"]``). ``stats`` (optional) accumulates ``deep_copies`` and ``reencode_s``.
    ``teacher`` (eval mode) gives the soft labels of the teacher terms when ``flags.teacher``.
    """
    if erase is None:

        def erase(x: Tensor) -> Tensor:
            return random_erasing(x, p=w["erasing_p"], generator=generator)

    if structure_detached is None:
        structure_detached = torch.rand((), generator=generator).item() < w["structure_detach_p"]
    e_app = nets.e_app
    gen_a, gen_b = _generators(nets, flags.batch_type)
    n_cls = flags.num_active_classes
    kind, id_tgt, id_adv = flags.batch_type, flags.b_ids, flags.steps_d_dom  # id_adv: id_adv_w > 0 (round 0)

    s_a = gen_a.encode(batch.x_a)
    s_b = gen_b.encode(batch.x_b)
    # One appearance-encoder call per image group, as the official trainer does.
    out_a, out_b = e_app(batch.x_a), e_app(batch.x_b)
    out_pa, out_pb = e_app(batch.xp_a), e_app(batch.xp_b)
    er_a, er_pa = e_app(erase(batch.x_a)), e_app(erase(batch.xp_a))
    er_b, er_pb = e_app(erase(batch.x_b)), e_app(erase(batch.xp_b))
    f_a, f_b = out_a.code, out_b.code

    x_ba = gen_b.decode(s_b, f_a)
    x_ab = gen_a.decode(s_a, f_b)
    x_a_recon = gen_a.decode(s_a, f_a)
    x_b_recon = gen_b.decode(s_b, f_b)
    x_a_recon_p = gen_a.decode(s_a, out_pa.code)
    x_b_recon_p = gen_b.decode(s_b, out_pb.code)

    start = time.perf_counter()
    e_twin = _frozen_copy(e_app, stats)
    re_ba, re_ab = e_twin(x_ba), e_twin(x_ab)
    if structure_detached:
        s_a_recon = gen_a.encode(x_ab.detach())
        s_b_recon = gen_b.encode(x_ba.detach())
    else:
        s_a_recon = _frozen_copy(gen_a.encoder, stats)(to_gray(x_ab))
        s_b_recon = _frozen_copy(gen_b.encoder, stats)(to_gray(x_ba))
    if stats is not None:
        _sync(x_ab)
        stats["reencode_s"] = stats.get("reencode_s", 0.0) + time.perf_counter() - start
    x_aba = gen_a.decode(s_a_recon, re_ba.code)
    x_bab = gen_b.decode(s_b_recon, re_ab.code)

    out: dict[str, Tensor] = {}
    out["recon_x"] = w["recon_x"] * (_l1(x_a_recon, batch.x_a) + _l1(x_b_recon, batch.x_b))
    # Positive reconstruction: recon_xp_w on a source half, recon_xp_w * recon_xp_tgt_w (ours: recon_xp_tgt) on a
    # target half. The source a half of aa and ab always has the term; a target half only when its weight is on.
    w_xp_a = w["recon_xp_tgt"] if kind == "bb" else w["recon_xp"]
    w_xp_b = w["recon_xp"] if kind == "aa" else w["recon_xp_tgt"]
    recon_xp = [w_xp_a * _l1(x_a_recon_p, batch.x_a)] if kind != "bb" or w_xp_a > 0 else []
    recon_xp += [w_xp_b * _l1(x_b_recon_p, batch.x_b)] if w_xp_b > 0 else []
    if recon_xp:
        out["recon_xp"] = sum(recon_xp)
    out["recon_s"] = w["recon_s"] * (_l1(s_a_recon, s_a) + _l1(s_b_recon, s_b))
    out["recon_f"] = w["recon_f"] * (_l1(re_ba.code, f_a) + _l1(re_ab.code, f_b))
    out["cycle"] = w["lambda_cyc"] * (_l1(x_aba, batch.x_a) + _l1(x_bab, batch.x_b))
    scale = w["gan_g_scale"]
    out["gan"] = w["gan"] * (_gen_adv(nets.d_img, x_ba, scale) + _gen_adv(nets.d_img, x_ab, scale))
    l_a, l_b = batch.l_a, batch.l_b
    fine = w["fine_grained"]

    def id_terms(er: AppearanceOutput, labels: Tensor) -> Tensor:
        return w["id"] * (_ce(er.logits[0], labels, n_cls) + fine * _ce(er.logits[1], labels, n_cls))

    # aa: ids, pids and recon ids on both source halves; ab: on the source half, and on the target half with
    # id_tgt (no target pid: tgt_pos 0); bb: none in warm-up, ids and recon ids on both halves with id_tgt, no pid.
    a_ids = kind != "bb" or id_tgt
    b_ids = kind == "aa" or id_tgt
    if a_ids:
        out["id_s1"] = id_terms(er_a, l_a)
    if kind != "bb":
        out["pid"] = w["pid"] * _ce(er_pa.logits[0], l_a, n_cls)
        if kind == "aa":
            out["pid"] = out["pid"] + w["pid"] * _ce(er_pb.logits[0], l_b, n_cls)
    if a_ids:
        out["id_s2"] = w["lambda_id"] * _ce(re_ba.logits[0], l_a, n_cls)
    if b_ids:
        out["id_t1"] = id_terms(er_b, l_b)
        out["id_t2"] = w["lambda_id"] * _ce(re_ab.logits[0], l_b, n_cls)
    # Domain adversarial (warm-up): on the target half of ab, the mean over both target halves of bb, none in aa.
    if id_adv and kind != "aa" and nets.d_dom is not None:
        red = w["domain_reduction"]
        adv = w["domain_g_scale"] * _reduce(nets.d_dom(out_b.feat).float().pow(2), red)
        if kind == "bb":
            adv = (adv + w["domain_g_scale"] * _reduce(nets.d_dom(out_a.feat).float().pow(2), red)) / 2
        out["domain_adv"] = w["domain_adv"] * adv
    # Teacher terms (official gen_update_aa / _ab; none in bb): the live encoder on each detached fake in its own call.
    if flags.teacher and kind != "bb":
        if teacher is None:
            raise ValueError("reference_g_losses: flags.teacher is set but no teacher was given")
        x_ba_copy, x_ab_copy = x_ba.detach(), x_ab.detach()
        st_ba, st_ab = e_app(x_ba_copy), e_app(x_ab_copy)
        n_all = st_ba.logits[0].shape[1]
        kl = _teacher_kl(st_ba.logits[0], _teacher_label(teacher, x_ba_copy, n_all), n_cls)
        if kind == "aa":
            kl = kl + _teacher_kl(st_ab.logits[0], _teacher_label(teacher, x_ab_copy, n_all), n_cls)
            fine_fake = _ce(st_ba.logits[1], l_b, n_cls) + _ce(st_ab.logits[1], l_a, n_cls)
        else:
            fine_fake = _ce(st_ab.logits[1], l_a, n_cls)
        out["teacher_kl"] = w["teacher_w"] * w["teacher_kl_w"] * kl
        out["teacher_b"] = w["teacher_w"] * w["teacher_b_w"] * fine_fake
    out["g_total"] = sum(out.values())
    return out


def reference_losses(
    nets: Nets,
    batch: PairBatch,
    flags: StepFlags,
    w: dict[str, Any],
    *,
    erase: Erase | None = None,
    structure_detached: bool | None = None,
    generator: torch.Generator | None = None,
    stats: dict[str, float] | None = None,
    teacher: nn.Module | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Both loss dictionaries at the current weights (no optimiser step between): ``(d_losses, g_losses)``."""
    d_losses = reference_d_losses(nets, batch, flags, w)
    g_losses = reference_g_losses(
        nets, batch, flags, w, erase=erase, structure_detached=structure_detached, generator=generator,
        stats=stats, teacher=teacher,
    )  # fmt: skip
    return d_losses, g_losses


def reference_iteration(
    nets: Nets,
    optimizers: dict[str, torch.optim.Optimizer],
    batch: PairBatch,
    flags: StepFlags,
    w: dict[str, Any],
    *,
    generator: torch.Generator | None = None,
    stats: dict[str, float] | None = None,
    teacher: nn.Module | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One official-structured iteration: D step (forward, backward, step), then G step on the same images.

    ``optimizers`` are keyed like ``DGNetPP._optim_names()``; ``stats`` also receives ``d_step_s`` and
    ``g_step_s`` (wall time, synchronised on CUDA).
    """
    t0 = time.perf_counter()
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    d_losses = reference_d_losses(nets, batch, flags, w)
    d_total = d_losses["d_img_total"] + d_losses.get("d_dom", 0.0)
    d_total.backward()
    optimizers["d_img"].step()
    if "d_dom" in d_losses:
        optimizers["d_dom"].step()
    _sync(batch.x_a)
    t1 = time.perf_counter()
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    g_losses = reference_g_losses(nets, batch, flags, w, generator=generator, stats=stats, teacher=teacher)
    g_losses["g_total"].backward()
    # Only the type's networks step (official: aa gen_a + id, ab gen_a + gen_b + id, bb gen_b + id).
    stepped = {"aa": ("gen_a", "e_app"), "ab": ("gen_a", "gen_b", "e_app"), "bb": ("gen_b", "e_app")}
    for name in stepped[flags.batch_type]:
        if name in optimizers:
            optimizers[name].step()
    _sync(batch.x_a)
    if stats is not None:
        stats["d_step_s"] = stats.get("d_step_s", 0.0) + t1 - t0
        stats["g_step_s"] = stats.get("g_step_s", 0.0) + time.perf_counter() - t1
    return d_losses, g_losses


__all__ = [
    "Nets",
    "reference_d_losses",
    "reference_g_losses",
    "reference_losses",
    "reference_iteration",
]
