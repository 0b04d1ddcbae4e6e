"""The optimised iteration (objective.*) equals the official-structured one (tests/reference_step.py).

Both paths see the same networks, batch and weights; every loss term and the gradients of every trained
network must agree in each phase (source stage, adapt warm-up, adapt self-training) and in both structure
re-encoding branches. Three sources of intended randomness or grouping are pinned so that the comparison is
exact:

- BatchNorm runs on running statistics (eval mode). The optimised path batches several image groups through
  one appearance-encoder call and both fakes through one frozen re-encoding, while the official structure
  calls the encoder per group, so batch statistics differ by design (BN grouping is a documented config
  choice). With ``model.appearance.bn_groups=official`` the optimised path calls the encoder per group too, and
  those cases run BatchNorm in train mode (batch statistics), as training does.
- Dropout is off (eval mode): its masks are random and drawn in a different order by the two paths.
- Random erasing is replaced by a fixed per-sample rectangle (its position depends on the sample itself, so
  the result does not depend on how the samples are grouped), and the structure re-encoding coin is forced
  to one branch with ``structure_detach_p`` 0.0 or 1.0.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import reference_step as ref
import torch
from configs import typed_train
from torch import Tensor, nn

from dgnetpp_pl import objective
from dgnetpp_pl.config import ModelConfig, coerce
from dgnetpp_pl.models.teacher import Teacher
from dgnetpp_pl.module import DGNetPP
from dgnetpp_pl.schedule import AdaptSchedule

H, W, B = 128, 64, 2  # ASPP (dilation 9 at 1/4 resolution) needs at least 80x40
N_SRC, CAPACITY, N_CLUSTERS = 6, 5, 4  # masking active in self-training: 6 + 4 of 11 classes
# (rtol, atol) of the losses and the gradient tolerance relative to each network's gradient scale. float32
# rounding (mostly in the first convolutions, which sum over every pixel) reaches a few 1e-3 of the scale,
# depending on the BLAS thread split. In float64 the gradients agree to ~1e-14; the loss values only to float32
# rounding, because the GAN terms are computed in float32 by design.
TOLERANCES = {torch.float32: (1e-4, 1e-5, 1e-2), torch.float64: (1e-7, 1e-9, 1e-10)}
# The id losses' cross entropy also runs in float32 (by design, as the GAN terms). Two target halves with recon-id
# terms (bb in self-training) send enough of its float32 rounding into the generators to reach ~1e-10 of their
# gradient scale in float64 (measured: 1.3e-10; 0 difference with lambda_id=0), so the per-type cases allow 1e-9.
TYPE_GRAD_TOL = {torch.float32: 1e-2, torch.float64: 1e-9}
CASES = [
    pytest.param(phase, detach_p, torch.float32, "joint", "default", id=f"{phase}-{branch}-fp32")
    for phase in ("source", "warmup", "self_training")
    for detach_p, branch in ((0.0, "frozen-encoder"), (1.0, "detached-fake"))
] + [
    pytest.param("self_training", 0.0, torch.float64, "joint", "default", id="self_training-frozen-encoder-fp64"),
    # Separate no-grad encoder call for the images whose outputs need no gradient (model.appearance.bn_groups=split).
    pytest.param("source", 0.0, torch.float32, "split", "default", id="source-split-call-fp32"),
    pytest.param("warmup", 1.0, torch.float32, "split", "default", id="warmup-split-call-fp32"),
    pytest.param("self_training", 0.0, torch.float64, "split", "default", id="self_training-split-call-fp64"),
    # Every memory option on (checkpointed encoders and decoder) against plain networks: fused decoder paths
    # off, nothing recomputed.
    pytest.param("source", 0.0, torch.float64, "split", "lowmem", id="source-lowmem-vs-plain-fp64"),
    pytest.param("self_training", 1.0, torch.float32, "joint", "lowmem", id="self_training-lowmem-vs-plain-fp32"),
    # Channels-last networks (model.channels_last) against plain contiguous ones.
    pytest.param("source", 0.0, torch.float64, "joint", "channels_last", id="source-channels-last-vs-plain-fp64"),
    pytest.param("warmup", 1.0, torch.float32, "split", "channels_last", id="warmup-channels-last-vs-plain-fp32"),
]
# The official batch mix's other types in the adapt stage: aa (two source halves, gen_a twice; in self-training
# only with adapt.aa_drop=false) and bb (two target halves, gen_b twice).
TYPE_CASES = [
    pytest.param(phase, kind, detach_p, dtype, "joint", id=f"{kind}-{phase}-{branch}-{str(dtype)[6:]}")
    for phase, kind, detach_p, dtype in (
        ("warmup", "aa", 0.0, torch.float32),
        ("self_training", "aa", 1.0, torch.float64),
        ("warmup", "bb", 1.0, torch.float32),
        ("warmup", "bb", 0.0, torch.float64),
        ("self_training", "bb", 0.0, torch.float32),
        ("self_training", "bb", 1.0, torch.float64),
    )
    for branch in ["frozen-encoder" if detach_p == 0.0 else "detached-fake"]
] + [
    # One encoder call per image group (model.appearance.bn_groups=official) against the per-group reference, with
    # BatchNorm on batch statistics.
    pytest.param(phase, kind, detach_p, dtype, "official", id=f"{kind}-{phase}-official-bn-train-{str(dtype)[6:]}")
    for phase, kind, detach_p, dtype in (
        ("warmup", "ab", 0.0, torch.float32),
        ("self_training", "ab", 1.0, torch.float64),
        ("warmup", "aa", 1.0, torch.float32),
        ("warmup", "bb", 0.0, torch.float32),
        ("self_training", "bb", 1.0, torch.float64),
    )
]
MEMORY_OPTIONS = {
    "default": {},
    "lowmem": {"appearance": {"checkpoint": True}, "structure": {"checkpoint": True}, "decoder": {"checkpoint": True}},
    "channels_last": {"channels_last": True},
}
PLAIN = {"appearance": {"checkpoint": False}, "structure": {"checkpoint": False}}
PLAIN["decoder"] = {"checkpoint": False, "fused": False}


@pytest.fixture(scope="module")
def small_cfg() -> dict:
    """The small model's config as a plain dict (the test edits it per case, then types it)."""
    return dataclasses.asdict(typed_train("model=dgnetpp_small", "data.height=128", "data.width=64").model)


def fixed_erase(x: Tensor, *args, **kwargs) -> Tensor:
    """Zero a rectangle whose rows depend on the sample's own first pixel: ``(N, 3, H, W)`` in and out."""
    h, w = x.shape[-2:]
    top = torch.where(x[:, 0, 0, 0] > 0, h // 2, h // 8)  # (N,)
    rows = torch.arange(h)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + h // 4)[:, None])  # (N, H)
    in_cols = torch.zeros(w, dtype=torch.bool)
    in_cols[w // 4 : 3 * w // 4] = True
    mask = in_rows[:, :, None] & in_cols[None, None, :]  # (N, H, W)
    return x.masked_fill(mask[:, None], 0.0)


def _images(n: int, g: torch.Generator, dtype: torch.dtype) -> Tensor:
    coarse = torch.randn(n, 3, H // 8, W // 8, generator=g)
    return nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False).to(dtype)


def _batch(stage: str, g: torch.Generator, dtype: torch.dtype, kind: str = "ab") -> dict:
    def half(n: int, num_labels: int) -> dict:
        return {
            "image": _images(n, g, dtype),
            "pos": _images(n, g, dtype),
            "label": torch.randint(num_labels, (n,), generator=g),
        }

    if stage == "source" or kind == "aa":
        return {"source": half(2 * B, N_SRC)}
    if kind == "bb":
        return {"target": half(2 * B, N_CLUSTERS)}
    return {"source": half(B, N_SRC), "target": half(B, N_CLUSTERS)}


def _build(cfg: dict, phase: str, dtype: torch.dtype, with_teacher: bool = False, bn_train: bool = False) -> DGNetPP:
    torch.manual_seed(0)
    stage, warmup = ("source" if phase == "source" else "adapt"), (1 if phase == "warmup" else 0)
    schedule = AdaptSchedule(stage, warmup_epochs=warmup, with_teacher=with_teacher)
    module = DGNetPP(cfg, schedule, num_source_ids=N_SRC, target_capacity=CAPACITY, image_size=(H, W))
    if phase == "self_training":
        module.set_target_classes(N_CLUSTERS)
    module.to(dtype).train()
    frozen_modes = nn.Dropout if bn_train else nn.Dropout | nn.modules.batchnorm._BatchNorm
    for m in module.modules():
        if isinstance(m, frozen_modes):
            m.eval()
    return module


Grads = dict[str, Tensor | None]


def _grads(modules: dict[str, nn.Module | None]) -> Grads:
    out = {}
    for name, mod in modules.items():
        for key, p in mod.named_parameters() if mod is not None else []:
            out[f"{name}.{key}"] = None if p.grad is None else p.grad.detach().clone()
    return out


def _backward(module: nn.Module, loss: Tensor, trained: dict[str, nn.Module | None]) -> Grads:
    module.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return _grads(trained)


def _assert_grads_equal(ours: Grads, theirs: Grads, tol: float) -> None:
    assert ours.keys() == theirs.keys()
    with_grad = [k for k, g in ours.items() if g is not None]
    assert with_grad, "no parameter received a gradient"
    for net in {k.split(".")[0] for k in with_grad}:
        # Errors are measured against the network's gradient scale: conv biases before InstanceNorm have a
        # true gradient of 0, so their own scale is pure rounding noise.
        own = [k for k in with_grad if k.startswith(f"{net}.") and theirs[k] is not None]
        scale = max((float(theirs[k].abs().max()) for k in own), default=0.0)
        for key in (k for k in ours if k.startswith(f"{net}.")):
            g, r = ours[key], theirs[key]
            assert (g is None) == (r is None), f"{key}: gradient present in one path only"
            if g is not None:
                err = float((g - r).abs().max())
                assert err <= tol * scale, f"{key}: gradients differ by {err:.3g} (network scale {scale:.3g})"


EXPECTED_TERMS = {
    "source": {"id_t1", "id_t2"},
    "warmup": {"domain_adv"},
    "self_training": {"id_t1", "id_t2"},
}
ABSENT_TERMS = {
    "source": {"domain_adv"},
    "warmup": {"id_t1", "id_t2"},
    "self_training": {"domain_adv"},
}


def _with(cfg: dict, options: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for group, values in options.items():
        if isinstance(values, dict):
            cfg[group].update(values)
        else:
            cfg[group] = values
    return cfg


def _compare(
    module: DGNetPP,
    plain: DGNetPP,
    batch: dict,
    cfg: dict,
    detach_p: float,
    dtype: torch.dtype,
    bn_groups: str,
    monkeypatch: pytest.MonkeyPatch,
    grad_tol: float | None = None,
) -> tuple[objective.StepFlags, dict, dict]:
    """Our losses and gradients against the reference's on one batch; returns the flags and our D and G terms."""
    rtol, atol, default_grad_tol = TOLERANCES[dtype]
    grad_tol = default_grad_tol if grad_tol is None else grad_tol
    w = coerce(ModelConfig, cfg, "model").loss
    pair, flags = module._pair_from_batch(batch)
    monkeypatch.setattr(objective, "random_erasing", fixed_erase)
    gen_a, gen_b = objective.generators_for(flags.batch_type, module.gen_a, module.gen_b_or_a)
    fwd = objective.forward_pair(
        module.e_app, gen_a, gen_b, pair, flags,
        erasing_p=w.erasing_p, structure_detach_p=detach_p, bn_groups=bn_groups,
    )  # fmt: skip
    d_ours = objective.image_d_loss(module.d_img, fwd, pair, gan_w=w.gan, r1_w=w.r1)
    if flags.steps_d_dom:
        d_ours["d_dom"] = objective.domain_d_loss(
            module.d_dom, fwd, weight=w.domain_adv, reduction=w.domain_reduction, batch_type=flags.batch_type
        )
    g_ours = objective.generator_losses(fwd, pair, flags, module.d_img, module.d_dom, w)
    d_ref, g_ref = ref.reference_losses(
        ref.Nets.from_module(plain), pair, flags, dataclasses.asdict(w), erase=fixed_erase,
        structure_detached=detach_p >= 1.0,
    )  # fmt: skip

    for ours, theirs in ((d_ours, d_ref), (g_ours, g_ref)):
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(
                ours[key],
                theirs[key],
                rtol=rtol,
                atol=atol,
                check_dtype=False,
                msg=lambda m, k=key: f"{flags.batch_type} {k}: {m}",
            )

    def d_nets(m: DGNetPP) -> dict[str, nn.Module | None]:
        return {"d_img": m.d_img, "d_dom": m.d_dom}

    def g_nets(m: DGNetPP) -> dict[str, nn.Module | None]:
        return {"gen_a": m.gen_a, "gen_b": m.gen_b, "e_app": m.e_app}

    d_total_ours = d_ours["d_img_total"] + d_ours.get("d_dom", 0.0)
    d_total_ref = d_ref["d_img_total"] + d_ref.get("d_dom", 0.0)
    d_grads = _backward(module, d_total_ours, d_nets(module))
    _assert_grads_equal(d_grads, _backward(plain, d_total_ref, d_nets(plain)), grad_tol)

    g_grads = _backward(module, g_ours["g_total"], g_nets(module))
    _assert_grads_equal(g_grads, _backward(plain, g_ref["g_total"], g_nets(plain)), grad_tol)
    return flags, d_ours, g_ours


def _teacher(dtype: torch.dtype) -> Teacher:
    """A small teacher with BatchNorm statistics off their initial values, so eval mode is not the identity."""
    torch.manual_seed(2)
    teacher = Teacher(N_SRC, arch="resnet18", bottleneck_dim=32)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, t in teacher.state_dict().items():
            if key.endswith("running_mean"):
                t.add_(0.1 * torch.randn(t.shape, generator=g))
            elif key.endswith("running_var"):
                t.mul_(1.0 + torch.rand(t.shape, generator=g))
    return teacher.to(dtype).eval()


@pytest.mark.parametrize(
    ("phase", "detach_p", "batch_type", "bn_groups"),
    [
        pytest.param("source", 0.0, "aa", "joint", id="source-aa-fp64"),
        # 5 target rows of capacity beyond the 6 source ids: the soft labels are zero-padded, the rows masked.
        pytest.param("warmup", 1.0, "ab", "joint", id="warmup-ab-fp64"),
        # The official mix's aa batch in the warm-up: the teacher labels both fakes, as in the source stage.
        pytest.param("warmup", 0.0, "aa", "joint", id="warmup-aa-fp64"),
        # One encoder call per fake (bn_groups=official) against the reference's calls, in train-mode BatchNorm.
        pytest.param("warmup", 1.0, "ab", "official", id="warmup-ab-official-bn-fp64"),
        pytest.param("source", 0.0, "aa", "official", id="source-aa-official-bn-fp64"),
    ],
)
def test_teacher_terms_equal_reference(
    small_cfg: dict, phase: str, detach_p: float, batch_type: str, bn_groups: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the teacher on, every term (the teacher KL and the fine-grained term included) and every gradient agree
    with the straightforward path, which runs each fake through its own encoder call and pads the teacher's
    probabilities by concatenation."""
    dtype = torch.float64
    rtol, atol, grad_tol = TOLERANCES[dtype]
    grad_tol = TYPE_GRAD_TOL[dtype] if bn_groups == "official" else grad_tol
    cfg = copy.deepcopy(small_cfg)
    cfg["loss"].update(structure_detach_p=detach_p, teacher_w=2.0)
    w = coerce(ModelConfig, cfg, "model").loss
    module = _build(cfg, phase, dtype, with_teacher=True, bn_train=bn_groups == "official")
    module.attach_teacher(_teacher(dtype))
    batch = _batch(module.stage, torch.Generator().manual_seed(1), dtype, batch_type)
    pair, flags = module._pair_from_batch(batch)
    assert flags.teacher and flags.batch_type == batch_type
    monkeypatch.setattr(objective, "random_erasing", fixed_erase)

    gen_a, gen_b = objective.generators_for(flags.batch_type, module.gen_a, module.gen_b_or_a)
    fwd = objective.forward_pair(
        module.e_app, gen_a, gen_b, pair, flags, erasing_p=w.erasing_p, structure_detach_p=detach_p,
        bn_groups=bn_groups, teacher=module.teacher,
    )  # fmt: skip
    d_ours = objective.image_d_loss(module.d_img, fwd, pair, gan_w=w.gan, r1_w=w.r1)
    if flags.steps_d_dom:
        d_ours["d_dom"] = objective.domain_d_loss(
            module.d_dom, fwd, weight=w.domain_adv, reduction=w.domain_reduction, batch_type=flags.batch_type
        )
    g_ours = objective.generator_losses(fwd, pair, flags, module.d_img, module.d_dom, w)
    d_ref, g_ref = ref.reference_losses(
        ref.Nets.from_module(module), pair, flags, dataclasses.asdict(w), erase=fixed_erase,
        structure_detached=detach_p >= 1.0, teacher=module.teacher,
    )  # fmt: skip

    assert {"teacher_kl", "teacher_b"} <= g_ours.keys()
    assert float(g_ours["teacher_kl"].detach()) > 0 and float(g_ours["teacher_b"].detach()) > 0
    for ours, theirs in ((d_ours, d_ref), (g_ours, g_ref)):
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(
                ours[key], theirs[key], rtol=rtol, atol=atol, check_dtype=False, msg=lambda m, k=key: f"{k}: {m}"
            )

    def g_nets(m: DGNetPP) -> dict[str, nn.Module | None]:
        return {"gen_a": m.gen_a, "gen_b": m.gen_b, "e_app": m.e_app}

    g_grads = _backward(module, g_ours["g_total"], g_nets(module))
    _assert_grads_equal(g_grads, _backward(module, g_ref["g_total"], g_nets(module)), grad_tol)
    # The teacher terms alone move the encoder and its heads (the rest of the total reaches them too, so check).
    terms = g_ours["teacher_kl"] + g_ours["teacher_b"]
    only = _backward(module, terms, g_nets(module))
    _assert_grads_equal(only, _backward(module, g_ref["teacher_kl"] + g_ref["teacher_b"], g_nets(module)), grad_tol)


@pytest.mark.parametrize(("phase", "detach_p", "dtype", "bn_groups", "memory"), CASES)
def test_optimised_iteration_equals_reference(
    small_cfg: dict,
    phase: str,
    detach_p: float,
    dtype: torch.dtype,
    bn_groups: str,
    memory: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every D and G loss term and the gradients of D_img, D_dom, G_a, G_b and E_app agree."""
    cfg = copy.deepcopy(small_cfg)
    cfg["loss"]["structure_detach_p"] = detach_p
    module = _build(_with(cfg, MEMORY_OPTIONS[memory]), phase, dtype)
    # The reference runs on plain networks with the same weights (the same networks unless memory options are on).
    plain = module if memory == "default" else _build(_with(cfg, PLAIN), phase, dtype)
    plain.load_state_dict(module.state_dict())
    if memory == "channels_last":
        convs = [p for p in module.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
        assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    batch = _batch(module.stage, torch.Generator().manual_seed(1), dtype)
    flags, d_ours, g_ours = _compare(module, plain, batch, cfg, detach_p, dtype, bn_groups, monkeypatch)

    assert EXPECTED_TERMS[phase] <= g_ours.keys()
    assert not ABSENT_TERMS[phase] & g_ours.keys()
    assert ("d_dom" in d_ours) == (phase == "warmup")
    assert flags.batch_type == ("aa" if phase == "source" else "ab")


# Per (phase, type): the flags the reference reads (b_ids: the official id_tgt; steps_d_dom: id_adv_w > 0) and the
# generator's domain-adversarial flag, the terms that must be there and the ones that must not.
TYPE_FLAGS = {
    ("warmup", "aa"): {"b_ids": True, "domain_adv": False, "steps_d_dom": True, "num_active_classes": N_SRC},
    ("self_training", "aa"): {
        "b_ids": True,
        "domain_adv": False,
        "steps_d_dom": False,
        "num_active_classes": N_SRC + N_CLUSTERS,
    },
    ("warmup", "bb"): {"b_ids": False, "domain_adv": True, "steps_d_dom": True, "num_active_classes": N_SRC},
    ("self_training", "bb"): {
        "b_ids": True,
        "domain_adv": False,
        "steps_d_dom": False,
        "num_active_classes": N_SRC + N_CLUSTERS,
    },
    ("warmup", "ab"): {"b_ids": False, "domain_adv": True, "steps_d_dom": True, "num_active_classes": N_SRC},
    ("self_training", "ab"): {
        "b_ids": True,
        "domain_adv": False,
        "steps_d_dom": False,
        "num_active_classes": N_SRC + N_CLUSTERS,
    },
}
ALL_IDS = {"id_s1", "id_s2", "id_t1", "id_t2", "pid"}
TYPE_TERMS = {  # (present, absent)
    ("warmup", "aa"): (ALL_IDS | {"recon_xp"}, {"domain_adv"}),
    ("self_training", "aa"): (ALL_IDS | {"recon_xp"}, {"domain_adv"}),
    ("warmup", "bb"): ({"domain_adv"}, ALL_IDS | {"recon_xp"}),
    ("self_training", "bb"): ({"id_s1", "id_s2", "id_t1", "id_t2"}, {"pid", "domain_adv", "recon_xp"}),
    ("warmup", "ab"): ({"id_s1", "id_s2", "pid", "domain_adv"}, {"id_t1", "id_t2"}),
    ("self_training", "ab"): ({"id_s1", "id_s2", "id_t1", "id_t2", "pid"}, {"domain_adv"}),
}


@pytest.mark.parametrize(("phase", "kind", "detach_p", "dtype", "bn_groups"), TYPE_CASES)
def test_each_batch_type_equals_its_official_reference(
    small_cfg: dict,
    phase: str,
    kind: str,
    detach_p: float,
    dtype: torch.dtype,
    bn_groups: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aa, bb and ab batches of the adapt stage: every term and gradient equals the official per-type step, also
    with one encoder call per image group against the per-group reference in train-mode BatchNorm."""
    cfg = copy.deepcopy(small_cfg)
    cfg["loss"]["structure_detach_p"] = detach_p
    bn_train = bn_groups == "official"
    module = _build(cfg, phase, dtype, bn_train=bn_train)
    assert any(m.training for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)) == bn_train
    batch = _batch("adapt", torch.Generator().manual_seed(2), dtype, kind)
    flags, d_ours, g_ours = _compare(
        module, module, batch, cfg, detach_p, dtype, bn_groups, monkeypatch, grad_tol=TYPE_GRAD_TOL[dtype]
    )

    assert flags.batch_type == kind
    assert {k: getattr(flags, k) for k in TYPE_FLAGS[phase, kind]} == TYPE_FLAGS[phase, kind]
    present, absent = TYPE_TERMS[phase, kind]
    assert present <= g_ours.keys() and not absent & g_ours.keys()
    assert ("d_dom" in d_ours) == (phase == "warmup")


@pytest.mark.parametrize("phase", ["warmup", "self_training"])
def test_teacher_terms_are_off_where_the_official_code_has_none(small_cfg: dict, phase: str) -> None:
    """bb batches never carry the teacher terms (official gen_update_bb), and self-training none at all (the official
    code drops the teacher after round 0), though the teacher is attached."""
    cfg = copy.deepcopy(small_cfg)
    cfg["loss"]["teacher_w"] = 2.0
    module = _build(cfg, phase, torch.float64, with_teacher=True)
    module.attach_teacher(_teacher(torch.float64))
    for kind in ("aa", "ab", "bb"):
        _, flags = module._pair_from_batch(_batch("adapt", torch.Generator().manual_seed(1), torch.float64, kind))
        assert flags.teacher == (phase == "warmup" and kind != "bb"), (phase, kind)
