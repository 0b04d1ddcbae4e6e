"""One DG-Net++ iteration as tensor math: the shared forward pass, the discriminator losses and the
generator/encoder losses. No Lightning here, so the terms can be tested and benchmarked alone.

Half ``a`` is the first half of the pair, ``b`` the second. In a cross-domain batch (type ab) ``a`` is the labelled
source and ``b`` the target; the source stage and the official mix's aa batches hold two source halves, its bb batches
two target halves. ``G_a`` and ``G_b`` are the generators of the halves' domains (both ``gen_a`` for aa, both
``gen_b`` for bb). ``x_ab = G_a(s_a, f_b)`` (structure of a, appearance of b) and ``x_ba = G_b(s_b, f_a)``, as in the
official code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call

from dgnetpp_pl import losses
from dgnetpp_pl.data.transforms import random_erasing
from dgnetpp_pl.models.appearance import AppearanceEncoder
from dgnetpp_pl.models.discriminators import DomainDiscriminator, MultiScaleImageDiscriminator
from dgnetpp_pl.models.generator import Generator

if TYPE_CHECKING:
    from dgnetpp_pl.config import LossConfig


@dataclass
class PairBatch:
    """Images ``(B, 3, H, W)`` and global class labels ``(B,)`` (-1: no id loss) of both halves."""

    x_a: Tensor
    xp_a: Tensor
    l_a: Tensor
    x_b: Tensor
    xp_b: Tensor
    l_b: Tensor


# Which domains a pair holds (official gen_update_aa / _ab / _bb): a source and a source, a source and a target, a
# target and a target.
BATCH_TYPES = ("aa", "ab", "bb")
# The batch types: the domain label of each half for the domain discriminator (source 0, target 1).
DOMAIN_LABELS = {"aa": (0.0, 0.0), "ab": (0.0, 1.0), "bb": (1.0, 1.0)}
# How the real images of an iteration meet BatchNorm in the appearance encoder (model.appearance.bn_groups).
BN_GROUPS = ("joint", "split", "official")


@dataclass
class StepFlags:
    """Which terms are active for this batch type in this phase (source stage, adapt warm-up, self-training).

    The a half's terms keep the source names (``id_s1``, ``id_s2``) and the b half's the target names (``id_t1``,
    ``id_t2``), whatever the halves' domains (the source stage's second half is a source batch).
    """

    b_ids: bool  # id losses on the b half (two-source batches, or target pseudo-labels in self-training)
    domain_adv: bool  # domain-adversarial alignment (adapt warm-up)
    recon_xp_b: float  # weight of the b-half positive reconstruction
    pid_b: bool  # positive id loss on the b half (two-source batches only; the official tgt_pos is 0)
    num_active_classes: int  # logits past this index are masked out (unused target capacity)
    batch_type: str = "ab"  # one of BATCH_TYPES: the domains of the halves (DOMAIN_LABELS)
    teacher: bool = False  # the teacher KL and the fine-grained term on generated images (aa and ab batches)
    a_ids: bool = True  # id losses on the a half (off for bb in warm-up: no labels)
    pid_a: bool = True  # positive id loss on the a half (off for bb: the official tgt_pos is 0)
    recon_xp_a: float | None = None  # weight of the a-half positive reconstruction; None: model.loss.recon_xp
    d_dom_step: bool | None = None  # D_dom trains on this batch (warm-up, every type); None: as domain_adv

    @property
    def steps_d_dom(self) -> bool:
        """Whether the D step trains D_dom on this batch (an aa batch in warm-up does, with no generator term)."""
        return self.domain_adv if self.d_dom_step is None else self.d_dom_step


@dataclass
class Forward:
    """Everything the D and G steps need, computed once per iteration."""

    x_ab: Tensor
    x_ba: Tensor
    tensors: dict[str, Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Temporarily stop gradients into the parameters of ``modules`` (inputs still receive gradients)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextlib.contextmanager
def dropout_off(module: nn.Module) -> Iterator[None]:
    """Dropout in eval mode while BatchNorm keeps using batch statistics (the official frozen copy's mode)."""
    drops = [m for m in module.modules() if isinstance(m, nn.Dropout) and m.training]
    for m in drops:
        m.eval()
    try:
        yield
    finally:
        for m in drops:
            m.train()


def frozen_call(module: nn.Module, method: str, *args: Tensor) -> object:
    """Run ``module.method`` on detached weights: gradients reach the inputs only and running stats stay put.

    Replaces the official per-step ``deepcopy`` of the encoders.
    """
    state = {k: v.detach() for k, v in module.named_parameters()}
    # Clones absorb the BatchNorm running-stat updates, so the live buffers are untouched.
    state.update({k: v.detach().clone() for k, v in module.named_buffers()})
    with dropout_off(module):
        if method == "forward":
            return functional_call(module, state, args, strict=False)
        return functional_call(_MethodAsForward(module, method), {f"inner.{k}": v for k, v in state.items()}, args)


class _MethodAsForward(nn.Module):
    """Exposes ``inner.<method>`` as ``forward`` so functional_call can run a method other than forward."""

    def __init__(self, inner: nn.Module, method: str) -> None:
        super().__init__()
        self.inner = inner
        self.method = method

    def forward(self, *args: Tensor) -> object:
        return getattr(self.inner, self.method)(*args)


def mask_logits(logits: Tensor, num_active: int) -> Tensor:
    """Hide classifier outputs past ``num_active`` (target capacity not in use this round)."""
    if num_active >= logits.shape[1]:
        return logits
    mask = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    mask[num_active:] = True
    return logits.masked_fill(mask, -1e4)


def _split(t: Tensor, sizes: list[int]) -> list[Tensor]:
    return list(torch.split(t, sizes, dim=0))


def _live_groups(e_app: AppearanceEncoder, groups: dict[str, Tensor], flags: StepFlags, bn_groups: str) -> set:
    """Names of the image groups whose encoder outputs need a graph (all of them in a joint call)."""
    if bn_groups == "joint" or not e_app.detach_code:
        return set(groups)
    # Erased views feed the id losses; the anchors' global features feed the domain-adversarial loss.
    erased = {n for n in groups if n.startswith("er")}
    return erased | ({"x_a", "x_b"} if flags.domain_adv else set())


def _encode_groups(
    e_app: AppearanceEncoder, groups: dict[str, Tensor], live: set, per_group: bool
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Appearance codes and global features per group: one call over the live groups and one no-grad call, or
    (``per_group``) one call per group."""
    codes: dict[str, Tensor] = {}
    feats: dict[str, Tensor] = {}
    calls = [[n] for n in groups] if per_group else [[n for n in groups if (n in live) == g] for g in (True, False)]
    for names in calls:
        if not names:
            continue
        with torch.set_grad_enabled(names[0] in live and torch.is_grad_enabled()):
            code, feat = e_app.backbone_forward(torch.cat([groups[n] for n in names]))
        sizes = [groups[n].shape[0] for n in names]
        codes.update(zip(names, _split(code, sizes), strict=True))
        feats.update(zip(names, _split(feat, sizes), strict=True))
    return codes, feats


def teacher_pass(
    e_app: AppearanceEncoder, teacher: nn.Module, fwd: Forward, flags: StepFlags, per_group: bool = False
) -> dict[str, Tensor]:
    """The live encoder on the detached fakes and the frozen teacher's soft labels (official gen_update_aa / _ab).

    One encoder call over ``x_ba`` and ``x_ab`` (train mode: batch statistics, dropout), or one per fake with
    ``per_group`` (``bn_groups=official``, as the official code's separate calls), detached, so the terms reach E_app
    and its heads only. ``aa``: soft labels of both fakes; ``ab``: of ``x_ba`` only (source appearance, which the
    source-trained teacher knows). Returns the masked logits ``(B, N)`` of each head on each fake (``student1_ba``,
    ...) and the soft labels ``(B, K)`` (``teacher_ba``, and ``teacher_ab`` in aa batches).
    """
    if flags.batch_type not in ("aa", "ab"):
        raise ValueError(f"teacher_pass: no teacher terms in {flags.batch_type!r} batches (only aa and ab).")
    bsz = fwd.x_ab.shape[0]
    fakes = torch.cat([fwd.x_ba, fwd.x_ab]).detach()
    out: dict[str, Tensor] = {}
    for name, images in [("ba", fakes[:bsz]), ("ab", fakes[bsz:])] if per_group else [("both", fakes)]:
        _, feat = e_app.backbone_forward(images)
        logits, _ = e_app.heads(feat)
        for head, lg in zip(("student1", "student2"), logits, strict=True):
            lg = mask_logits(lg, flags.num_active_classes)
            if name == "both":
                out[f"{head}_ba"], out[f"{head}_ab"] = _split(lg, [bsz, bsz])
            else:
                out[f"{head}_{name}"] = lg
    labelled = fakes if flags.batch_type == "aa" else fakes[:bsz]
    with torch.no_grad():
        both = teacher(torch.cat([labelled, torch.flip(labelled, dims=[3])]))
    soft = losses.teacher_soft_label(*both.chunk(2))
    out["teacher_ba"] = soft[:bsz]
    if flags.batch_type == "aa":
        out["teacher_ab"] = soft[bsz:]
    return out


def _erased_logits(
    e_app: AppearanceEncoder, feats: dict[str, Tensor], names: list[str], per_group: bool, num_active: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """Both heads' masked logits ``(B, N)`` of each erased group: one head call on the joint ``feats["erased"]``, or
    (``per_group``) one call per group."""
    if not names:
        return {}
    calls = [(feats[n], [n]) for n in names] if per_group else [(feats["erased"], names)]
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for feat, group in calls:
        logits, _ = e_app.heads(feat)
        sizes = [feat.shape[0] // len(group)] * len(group)
        pieces = [_split(mask_logits(lg, num_active), sizes) for lg in logits]
        out.update(zip(group, zip(*pieces, strict=True), strict=True))
    return out


def forward_pair(
    e_app: AppearanceEncoder,
    gen_a: Generator,
    gen_b: Generator,
    batch: PairBatch,
    flags: StepFlags,
    *,
    erasing_p: float,
    structure_detach_p: float,
    generator: torch.Generator | None = None,
    bn_groups: str = "joint",
    teacher: nn.Module | None = None,
) -> Forward:
    """Encode, swap, re-encode and cycle once; every tensor the losses use is kept in ``Forward.tensors``.

    ``gen_a`` / ``gen_b`` are the generators of the a and b halves' domains (:func:`generators_for`).
    ``bn_groups`` (``model.appearance.bn_groups``): ``"joint"``, all real images in one appearance-encoder call
    (BatchNorm statistics over all of them); ``"split"``, the images whose outputs need no gradient (detached codes,
    features no loss uses) in a separate no-grad call that stores no activations; ``"official"``, one call per image
    group and per re-encoded fake, as the official code (the no-grad groups stay no-grad). Only the groups the flags
    use are encoded. ``teacher`` (eval mode, frozen) is needed when ``flags.teacher``: then :func:`teacher_pass`
    runs on the fakes.
    """
    if bn_groups not in BN_GROUPS:
        raise ValueError(f"forward_pair: bn_groups must be one of {BN_GROUPS}, got {bn_groups!r}")
    if flags.teacher and teacher is None:
        raise ValueError("forward_pair: flags.teacher is set but no teacher was given.")
    per_group = bn_groups == "official"
    bsz = batch.x_a.shape[0]
    # Erased anchor and positive of each half with id losses (the positive's logits feed the pid term).
    erase_names = (["er_x_a", "er_xp_a"] if flags.a_ids else []) + (["er_x_b", "er_xp_b"] if flags.b_ids else [])
    erase_src = ([batch.x_a, batch.xp_a] if flags.a_ids else []) + ([batch.x_b, batch.xp_b] if flags.b_ids else [])
    need_xp_a = flags.recon_xp_a is None or flags.recon_xp_a > 0
    need_xp_b = flags.recon_xp_b > 0
    groups = {"x_a": batch.x_a, "x_b": batch.x_b}
    if need_xp_a:
        groups["xp_a"] = batch.xp_a
    if need_xp_b:
        groups["xp_b"] = batch.xp_b
    if erase_src:
        erased = random_erasing(torch.cat(erase_src), p=erasing_p, generator=generator)
        if per_group:
            groups.update(zip(erase_names, _split(erased, [bsz] * len(erase_src)), strict=True))
        else:
            groups["erased"] = erased
    codes, feats = _encode_groups(e_app, groups, _live_groups(e_app, groups, flags, bn_groups), per_group)
    f_a, f_b = codes["x_a"], codes["x_b"]
    fe_a, fe_b = feats["x_a"], feats["x_b"]
    logits_er = _erased_logits(e_app, feats, erase_names, per_group, flags.num_active_classes)

    # Structure codes; generators have only per-sample norms, so batching their calls changes nothing.
    s_a = gen_a.encode(batch.x_a)
    s_b = gen_b.encode(batch.x_b)
    dec_a_f = [f_a] + ([codes["xp_a"]] if need_xp_a else []) + [f_b]
    out_a = _split(gen_a.decode(torch.cat([s_a] * len(dec_a_f)), torch.cat(dec_a_f)), [bsz] * len(dec_a_f))
    x_a_recon, x_ab = out_a[0], out_a[-1]
    dec_b_f = [f_b, f_a] + ([codes["xp_b"]] if need_xp_b else [])
    out_b = _split(gen_b.decode(torch.cat([s_b] * len(dec_b_f)), torch.cat(dec_b_f)), [bsz] * len(dec_b_f))
    x_b_recon, x_ba = out_b[0], out_b[1]

    # Re-encode the fakes with frozen weights: the gradient reaches the generators only.
    if per_group:
        re_ba, re_ab = frozen_call(e_app, "forward", x_ba), frozen_call(e_app, "forward", x_ab)
        f_a_recon, f_b_recon = re_ba.code, re_ab.code
        re_logits = [mask_logits(r.logits[0], flags.num_active_classes) for r in (re_ba, re_ab)]
    else:
        re_out = frozen_call(e_app, "forward", torch.cat([x_ba, x_ab]))
        f_a_recon, f_b_recon = _split(re_out.code, [bsz, bsz])
        re_logits = _split(mask_logits(re_out.logits[0], flags.num_active_classes), [bsz, bsz])

    # use_encoder_again: train the structure encoder on the detached fake, or the generator through a frozen one.
    use_detached = torch.rand((), generator=generator).item() < structure_detach_p
    if use_detached:
        s_a_recon = gen_a.encode(x_ab.detach())
        s_b_recon = gen_b.encode(x_ba.detach())
    else:
        s_a_recon = frozen_call(gen_a, "encode", x_ab)
        s_b_recon = frozen_call(gen_b, "encode", x_ba)
    x_aba = gen_a.decode(s_a_recon, f_a_recon)
    x_bab = gen_b.decode(s_b_recon, f_b_recon)

    t = {
        "f_a": f_a,
        "f_b": f_b,
        "fe_a": fe_a,
        "fe_b": fe_b,
        "s_a": s_a,
        "s_b": s_b,
        "x_a_recon": x_a_recon,
        "x_b_recon": x_b_recon,
        "f_a_recon": f_a_recon,
        "f_b_recon": f_b_recon,
        "s_a_recon": s_a_recon,
        "s_b_recon": s_b_recon,
        "x_aba": x_aba,
        "x_bab": x_bab,
        "re_logits_ba": re_logits[0],
        "re_logits_ab": re_logits[1],
    }
    for half in ("a", "b") if erase_src else ():
        if f"er_x_{half}" in logits_er:
            t[f"id1_{half}"], t[f"id2_{half}"] = logits_er[f"er_x_{half}"]
            t[f"pid_{half}"] = logits_er[f"er_xp_{half}"][0]
    if need_xp_a:
        t["x_a_recon_p"] = out_a[1]
    if need_xp_b:
        t["x_b_recon_p"] = out_b[2]
    fwd = Forward(x_ab=x_ab, x_ba=x_ba, tensors=t)
    if flags.teacher:
        t.update(teacher_pass(e_app, teacher, fwd, flags, per_group))
    return fwd


def image_d_loss(
    d_img: MultiScaleImageDiscriminator, fwd: Forward, batch: PairBatch, *, gan_w: float, r1_w: float
) -> dict[str, Tensor]:
    """D_img step: LSGAN on detached fakes vs reals plus the R1 penalty (official ``dis_update``)."""
    bsz = batch.x_a.shape[0]
    fake = torch.cat([fwd.x_ba, fwd.x_ab]).detach()
    # A fresh leaf for the R1 gradient, so the generator step never back-propagates into the inputs.
    real = torch.cat([batch.x_a, batch.x_b]).detach().requires_grad_(r1_w > 0)
    d_fake = d_img(fake)
    d_real = d_img(real)
    gan = fake.new_zeros(())
    # The official code calls D once per (fake, real) pair and sums; D has no BatchNorm, so split the outputs.
    for half in range(2):
        sl = slice(half * bsz, (half + 1) * bsz)
        gan = gan + losses.lsgan_d_loss([o[sl] for o in d_fake], [o[sl] for o in d_real])
    out = {"d_img_gan": gan_w * gan}
    if r1_w > 0:
        # r1_penalty averages over the joint batch; the official sum over two calls of B is twice that.
        out["d_img_r1"] = gan_w * r1_w * 2.0 * losses.r1_penalty(d_real, real)
    out["d_img_total"] = sum(out.values())
    return out


def domain_d_loss(
    d_dom: DomainDiscriminator, fwd: Forward, *, weight: float, reduction: str, batch_type: str = "ab"
) -> Tensor:
    """D_dom step on detached global appearance features: each half towards its domain's label (source 0, target 1;
    official ``calc_dis_loss_ab / _aa / _bb``), one discriminator call per half."""
    t = fwd.tensors
    label_a, label_b = DOMAIN_LABELS[batch_type]
    d_a = losses.domain_lsgan(d_dom(t["fe_a"].detach()), label_a, reduction)
    return weight * (d_a + losses.domain_lsgan(d_dom(t["fe_b"].detach()), label_b, reduction))


def generator_losses(
    fwd: Forward,
    batch: PairBatch,
    flags: StepFlags,
    d_img: MultiScaleImageDiscriminator,
    d_dom: DomainDiscriminator | None,
    w: LossConfig,
) -> dict[str, Tensor]:
    """Weighted generator/encoder terms; ``w`` is the ``model.loss`` config. Keys are logged as ``train/<key>``."""
    t = fwd.tensors
    l1 = losses.recon_l1
    out: dict[str, Tensor] = {}
    out["recon_x"] = w.recon_x * (l1(t["x_a_recon"], batch.x_a) + l1(t["x_b_recon"], batch.x_b))
    recon_xp = []
    if "x_a_recon_p" in t:
        weight = w.recon_xp if flags.recon_xp_a is None else flags.recon_xp_a
        recon_xp.append(weight * l1(t["x_a_recon_p"], batch.x_a))
    if "x_b_recon_p" in t:
        recon_xp.append(flags.recon_xp_b * l1(t["x_b_recon_p"], batch.x_b))
    if recon_xp:
        out["recon_xp"] = recon_xp[0] if len(recon_xp) == 1 else recon_xp[0] + recon_xp[1]
    out["recon_s"] = w.recon_s * (l1(t["s_a_recon"], t["s_a"]) + l1(t["s_b_recon"], t["s_b"]))
    out["recon_f"] = w.recon_f * (l1(t["f_a_recon"], t["f_a"]) + l1(t["f_b_recon"], t["f_b"]))
    out["cycle"] = w.lambda_cyc * (l1(t["x_aba"], batch.x_a) + l1(t["x_bab"], batch.x_b))
    with frozen(d_img):
        d_fake = d_img(torch.cat([fwd.x_ba, fwd.x_ab]))
    bsz = batch.x_a.shape[0]
    gan = sum(losses.lsgan_g_loss([o[h * bsz : (h + 1) * bsz] for o in d_fake], scale=w.gan_g_scale) for h in range(2))
    out["gan"] = w.gan * gan
    ce = losses.id_loss
    if flags.a_ids:
        out["id_s1"] = w.id * (ce(t["id1_a"], batch.l_a) + w.fine_grained * ce(t["id2_a"], batch.l_a))
    if flags.a_ids and flags.pid_a:
        out["pid"] = w.pid * ce(t["pid_a"], batch.l_a)
    if flags.a_ids:
        out["id_s2"] = w.lambda_id * ce(t["re_logits_ba"], batch.l_a)
    if flags.b_ids:
        out["id_t1"] = w.id * (ce(t["id1_b"], batch.l_b) + w.fine_grained * ce(t["id2_b"], batch.l_b))
        out["id_t2"] = w.lambda_id * ce(t["re_logits_ab"], batch.l_b)
    if flags.b_ids and flags.pid_b:
        pid_b = w.pid * ce(t["pid_b"], batch.l_b)
        out["pid"] = out["pid"] + pid_b if "pid" in out else pid_b
    if flags.domain_adv and d_dom is not None:
        g_loss = losses.domain_g_loss
        with frozen(d_dom):
            adv = g_loss(d_dom(t["fe_b"]), w.domain_reduction, scale=w.domain_g_scale)
            if flags.batch_type == "bb":  # both halves are target: the mean of their two terms (official)
                adv = (adv + g_loss(d_dom(t["fe_a"]), w.domain_reduction, scale=w.domain_g_scale)) / 2
        out["domain_adv"] = w.domain_adv * adv
    if flags.teacher:
        out.update(teacher_losses(t, batch, flags, w))
    out["g_total"] = sum(out.values())
    return out


def teacher_losses(t: dict[str, Tensor], batch: PairBatch, flags: StepFlags, w: LossConfig) -> dict[str, Tensor]:
    """``teacher_kl``: ``teacher_w * teacher_kl_w * L_prim``, the KL of the primary head to the teacher on ``x_ba``
    (and ``x_ab`` in aa batches); ``teacher_b``: ``teacher_w * teacher_b_w * L_fine``, the fine-grained head's cross
    entropy against the identity of each fake's structure provider (``x_ab``: ``l_a``; in aa batches also ``x_ba``:
    ``l_b``). ``t`` holds :func:`teacher_pass`'s outputs."""
    kl = losses.teacher_kl(t["student1_ba"], t["teacher_ba"])
    fine = losses.id_loss(t["student2_ab"], batch.l_a)
    if flags.batch_type == "aa":
        kl = kl + losses.teacher_kl(t["student1_ab"], t["teacher_ab"])
        fine = losses.id_loss(t["student2_ba"], batch.l_b) + fine
    return {"teacher_kl": w.teacher_w * w.teacher_kl_w * kl, "teacher_b": w.teacher_w * w.teacher_b_w * fine}


def _halves(part: dict[str, Tensor], labels: Tensor) -> PairBatch:
    """The first and second half of one domain's batch of 2B images as the a and b halves."""
    half = part["image"].shape[0] // 2
    image, pos = part["image"], part["pos"]
    return PairBatch(
        x_a=image[:half], xp_a=pos[:half], l_a=labels[:half], x_b=image[half:], xp_b=pos[half:], l_b=labels[half:]
    )


def _target_labels(labels: Tensor, num_source_ids: int) -> Tensor:
    """Target pseudo-labels as joint-classifier classes: shifted past the source classes, -1 stays -1."""
    return torch.where(labels >= 0, labels + num_source_ids, torch.full_like(labels, -1))


def pair_from_batch(
    batch: dict[str, dict[str, Tensor]],
    phase: str,
    num_source_ids: int,
    num_target_classes: int,
    w: LossConfig,
    teacher: bool = False,
) -> tuple[PairBatch, StepFlags]:
    """The two halves of one iteration and the terms active for its batch type in ``phase``.

    The batch's domains give its type: ``{"source", "target"}`` is ab (source half a, target half b);
    ``{"source"}`` alone is aa (the first and second half of 2B source images: the source stage, or an aa batch of
    the official mix); ``{"target"}`` alone is bb. Target pseudo-labels are shifted past the ``num_source_ids``
    source classes (-1 stays -1). The flags follow the official ``gen_update_aa / _ab / _bb``. ``teacher``: the
    teacher terms are active in this epoch (``AdaptSchedule.teacher_active``); they apply to aa and ab batches.
    """
    if phase == "source":
        src = batch["source"]
        pair = _halves(src, src["label"])
        flags = StepFlags(
            b_ids=True, domain_adv=False, recon_xp_b=w.recon_xp, pid_b=True, num_active_classes=num_source_ids,
            batch_type="aa", teacher=teacher,
        )  # fmt: skip
        return pair, flags
    self_training = phase == "self_training" and num_target_classes > 0
    warmup_adv = phase == "warmup" and w.domain_adv > 0
    active = num_source_ids + (num_target_classes if self_training else 0)
    if "target" not in batch:  # aa: DG-Net on two source halves, no domain-adversarial term
        src = batch["source"]
        flags = StepFlags(
            b_ids=True, domain_adv=False, recon_xp_b=w.recon_xp, pid_b=True, num_active_classes=active,
            batch_type="aa", d_dom_step=warmup_adv, teacher=teacher,
        )  # fmt: skip
        return _halves(src, src["label"]), flags
    if "source" not in batch:  # bb: no id loss in warm-up; pseudo-label ids on both halves, no pid, in self-training
        tgt = batch["target"]
        flags = StepFlags(
            b_ids=self_training, domain_adv=warmup_adv, recon_xp_b=w.recon_xp_tgt, pid_b=False,
            num_active_classes=active, batch_type="bb", a_ids=self_training, pid_a=False, recon_xp_a=w.recon_xp_tgt,
        )  # fmt: skip
        return _halves(tgt, _target_labels(tgt["label"], num_source_ids)), flags
    s, t = batch["source"], batch["target"]
    l_b = _target_labels(t["label"], num_source_ids)
    pair = PairBatch(x_a=s["image"], xp_a=s["pos"], l_a=s["label"], x_b=t["image"], xp_b=t["pos"], l_b=l_b)
    flags = StepFlags(
        b_ids=self_training,
        domain_adv=warmup_adv,
        recon_xp_b=w.recon_xp_tgt,
        pid_b=False,
        num_active_classes=active,
        batch_type="ab",
        teacher=teacher,
    )
    return pair, flags


def generators_for(batch_type: str, gen_a: Generator, gen_b: Generator) -> tuple[Generator, Generator]:
    """The generators of the a and b halves: ``gen_a`` (source) for both halves of aa, ``gen_b`` (target) for
    both of bb, one each for ab (official ``gen_update_aa / _bb / _ab``)."""
    return {"aa": (gen_a, gen_a), "ab": (gen_a, gen_b), "bb": (gen_b, gen_b)}[batch_type]


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Top-1 accuracy over labelled samples (labels >= 0); 0 when none is labelled."""
    keep = labels >= 0
    if not bool(keep.any()):
        return logits.new_zeros(())
    return (logits[keep].argmax(1) == labels[keep]).float().mean()


__all__ = [
    "BN_GROUPS",
    "DOMAIN_LABELS",
    "PairBatch",
    "StepFlags",
    "Forward",
    "BATCH_TYPES",
    "forward_pair",
    "teacher_pass",
    "teacher_losses",
    "image_d_loss",
    "domain_d_loss",
    "generator_losses",
    "pair_from_batch",
    "generators_for",
    "frozen",
    "frozen_call",
    "mask_logits",
    "accuracy",
]
