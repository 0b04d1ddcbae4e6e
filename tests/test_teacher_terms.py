"""The teacher terms on generated images: where their gradients go, when the schedule turns them on, how the
module holds the teacher, the teacher reference of checkpoints, and which stages a run trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from configs import typed_train
from torch import nn

from dgnetpp_pl import objective
from dgnetpp_pl.checkpoints import CheckpointError
from dgnetpp_pl.config import ConfigError, LossConfig
from dgnetpp_pl.models.teacher import Teacher
from dgnetpp_pl.module import DGNetPP
from dgnetpp_pl.schedule import AdaptSchedule
from dgnetpp_pl.teacher_checkpoint import check_teacher_reference, file_sha256, save_teacher, teacher_reference
from dgnetpp_pl.train import stages_to_run, uses_teacher

H, W, B, N_SRC, CAPACITY = 64, 32, 3, 5, 4


def _module(phase: str, with_teacher: bool = True) -> DGNetPP:
    cfg = typed_train("experiment=demo", "model.loss.teacher_w=2").model
    stage = "source" if phase == "source" else "adapt"
    schedule = AdaptSchedule(stage, warmup_epochs=1 if phase == "warmup" else 0, with_teacher=with_teacher)
    torch.manual_seed(0)
    module = DGNetPP(cfg, schedule, num_source_ids=N_SRC, target_capacity=CAPACITY, image_size=(H, W))
    if phase == "self_training":
        module.set_target_classes(2)
    return module.train()


def _teacher() -> Teacher:
    torch.manual_seed(1)
    return Teacher(N_SRC, arch="resnet18", bottleneck_dim=16)


def _batch(stage: str) -> dict:
    g = torch.Generator().manual_seed(2)

    def half(n: int) -> dict:
        return {
            "image": torch.randn(n, 3, H, W, generator=g),
            "pos": torch.randn(n, 3, H, W, generator=g),
            "label": torch.arange(n) % N_SRC,
        }

    return {"source": half(2 * B)} if stage == "source" else {"source": half(B), "target": half(B)}


def _grads(loss: torch.Tensor, named: dict[str, nn.Module]) -> dict[str, bool]:
    """Per network: whether ``loss`` has a nonzero gradient on any of its parameters."""
    params = {name: [p for p in m.parameters() if p.requires_grad] for name, m in named.items()}
    flat = [p for ps in params.values() for p in ps]
    grads = torch.autograd.grad(loss, flat, allow_unused=True, retain_graph=True)
    out, i = {}, 0
    for name, ps in params.items():
        chunk = grads[i : i + len(ps)]
        out[name] = any(g is not None and bool(g.abs().sum() > 0) for g in chunk)
        i += len(ps)
    return out


@pytest.mark.parametrize(("phase", "batch_type"), [("source", "aa"), ("warmup", "ab")])
def test_teacher_terms_train_the_encoder_and_its_heads_only(phase: str, batch_type: str) -> None:
    module = _module(phase)
    teacher = _teacher()
    module.attach_teacher(teacher)
    pair, flags = module._pair_from_batch(_batch(module.stage))
    assert (flags.teacher, flags.batch_type) == (True, batch_type)
    fwd = objective.forward_pair(
        module.e_app, module.gen_a, module.gen_b_or_a, pair, flags, erasing_p=0.5, structure_detach_p=0.5,
        teacher=module.teacher,
    )  # fmt: skip
    terms = objective.generator_losses(fwd, pair, flags, module.d_img, module.d_dom, module.cfg.loss)
    e = module.e_app
    named = {"backbone": e.backbone, "head1": e.head1, "head2": e.head2, "gen_a": module.gen_a, "d_img": module.d_img}
    if module.gen_b is not None:
        named |= {"gen_b": module.gen_b, "d_dom": module.d_dom}
    # The teacher is frozen: its parameters take no gradient at all (and requires_grad is off).
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher_grads = torch.autograd.grad(
        terms["teacher_kl"] + terms["teacher_b"], [p.requires_grad_(True) for p in teacher.parameters()],
        allow_unused=True, retain_graph=True,
    )  # fmt: skip
    assert all(g is None for g in teacher_grads)
    teacher.requires_grad_(False)
    nothing_else = dict.fromkeys(set(named) - {"backbone", "head1", "head2"}, False)
    # L_prim: the primary head's KL; L_fine: the fine-grained head's cross entropy.
    assert _grads(terms["teacher_kl"], named) == {"backbone": True, "head1": True, "head2": False, **nothing_else}
    assert _grads(terms["teacher_b"], named) == {"backbone": True, "head1": False, "head2": True, **nothing_else}


def test_the_weights_combine_as_teacher_w_times_t_w_kl_plus_b_w_fine() -> None:
    module = _module("source")
    module.attach_teacher(_teacher())
    pair, flags = module._pair_from_batch(_batch("source"))
    module.eval()  # no dropout: the same forward twice
    fwd = objective.forward_pair(
        module.e_app, module.gen_a, module.gen_b_or_a, pair, flags, erasing_p=0.0, structure_detach_p=1.0,
        teacher=module.teacher,
    )  # fmt: skip
    t = fwd.tensors
    unit = objective.teacher_losses(t, pair, flags, LossConfig(teacher_w=1.0, teacher_b_w=1.0))
    terms = objective.teacher_losses(t, pair, flags, module.cfg.loss)
    w = module.cfg.loss
    assert (w.teacher_w, w.teacher_kl_w, w.teacher_b_w) == (2.0, 1.0, 0.2)
    torch.testing.assert_close(terms["teacher_kl"], 2.0 * 1.0 * unit["teacher_kl"])
    torch.testing.assert_close(terms["teacher_b"], 2.0 * 0.2 * unit["teacher_b"])
    # aa: the fine-grained head predicts each fake's structure provider: x_ba has b's structure, x_ab a's.
    expected = nn.functional.cross_entropy(t["student2_ba"], pair.l_b) + nn.functional.cross_entropy(
        t["student2_ab"], pair.l_a
    )
    torch.testing.assert_close(unit["teacher_b"], expected)


def test_schedule_turns_the_teacher_on_in_the_source_stage_and_the_warm_up_only() -> None:
    assert AdaptSchedule("source", with_teacher=True).teacher_active(5)
    adapt = AdaptSchedule("adapt", warmup_epochs=2, with_teacher=True)
    assert [adapt.teacher_active(e) for e in range(4)] == [True, True, False, False]
    assert not any(AdaptSchedule("adapt", warmup_epochs=2).teacher_active(e) for e in range(4))
    assert AdaptSchedule("teacher").phase(0) == "teacher"


def test_self_training_flags_no_teacher_and_a_scheduled_teacher_must_be_attached() -> None:
    module = _module("self_training")
    module.attach_teacher(_teacher())
    _, flags = module._pair_from_batch(_batch("adapt"))
    assert not flags.teacher and flags.batch_type == "ab"
    bare = _module("source")
    with pytest.raises(RuntimeError, match="no teacher is attached"):
        bare._pair_from_batch(_batch("source"))
    _, flags = _module("source", with_teacher=False)._pair_from_batch(_batch("source"))
    assert not flags.teacher and flags.batch_type == "aa"


def test_teacher_pass_refuses_bb_batches_and_forward_needs_the_teacher() -> None:
    module = _module("warmup")
    pair, flags = objective.pair_from_batch(_batch("adapt"), "warmup", N_SRC, 0, module.cfg.loss, teacher=True)
    with pytest.raises(ValueError, match="no teacher was given"):
        objective.forward_pair(
            module.e_app, module.gen_a, module.gen_b, pair, flags, erasing_p=0.5, structure_detach_p=0.5
        )
    fake = objective.Forward(x_ab=pair.x_a, x_ba=pair.x_b)
    bb = objective.StepFlags(False, True, 0.0, False, N_SRC, batch_type="bb", teacher=True)
    with pytest.raises(ValueError, match="only aa and ab"):
        objective.teacher_pass(module.e_app, _teacher(), fake, bb)


def test_the_teacher_is_outside_the_state_dict_stays_in_eval_and_follows_the_device_and_dtype() -> None:
    module = _module("source")
    keys = set(module.state_dict())
    teacher = _teacher().train()
    module.attach_teacher(teacher, {"path": "/t.ckpt", "sha256": "ab"})
    assert set(module.state_dict()) == keys and not any(k.startswith("teacher") for k in keys)
    assert all(id(p) not in {id(q) for q in teacher.parameters()} for p in module.parameters())
    module.train()
    assert not any(m.training for m in teacher.modules())
    module.double()
    assert all(p.dtype == torch.float64 for p in teacher.parameters())
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["dgnetpp"]["teacher"] == {"path": "/t.ckpt", "sha256": "ab"}
    with pytest.raises(ValueError, match="scores 7 identities but the source has 5"):
        _module("source").attach_teacher(Teacher(7, arch="resnet18", bottleneck_dim=16))


def test_teacher_reference_and_the_resume_check(tmp_path: Path) -> None:
    one = save_teacher(_teacher(), tmp_path / "one.ckpt")
    other = _teacher()
    with torch.no_grad():
        other.head.classifier.bias.add_(1.0)
    two = save_teacher(other, tmp_path / "two.ckpt")
    ref_one, ref_two = teacher_reference(one), teacher_reference(two)
    assert ref_one["sha256"] == file_sha256(one) != ref_two["sha256"] and ref_one["path"] == str(one.resolve())
    moved = tmp_path / "moved.ckpt"
    moved.write_bytes(one.read_bytes())
    check_teacher_reference(ref_one, teacher_reference(moved), "run/last.ckpt")  # same content: accepted
    check_teacher_reference(None, None, "run/last.ckpt")
    with pytest.raises(CheckpointError, match=r"run/last.ckpt was trained with the teacher .*one.ckpt.*two.ckpt"):
        check_teacher_reference(ref_one, ref_two, "run/last.ckpt")
    with pytest.raises(CheckpointError, match="trained without a teacher"):
        check_teacher_reference(None, ref_one, "run/last.ckpt")
    with pytest.raises(CheckpointError, match="this run has none"):
        check_teacher_reference(ref_one, None, "run/last.ckpt")


def test_stages_a_run_trains() -> None:
    def stages(*overrides: str) -> list[str]:
        return stages_to_run(typed_train("experiment=demo", *overrides))

    assert stages() == ["source", "adapt"]  # the demo's teacher is off: today's pipeline
    assert stages("model.loss.teacher_w=2") == ["teacher", "source", "adapt"]
    assert stages("model.loss.teacher_w=2", "stage=source") == ["teacher", "source"]
    assert stages("stage=teacher") == ["teacher"]
    assert stages("model.loss.teacher_w=2", "teacher_ckpt=t.ckpt") == ["source", "adapt"]
    assert stages("model.loss.teacher_w=2", "init_ckpt=s.ckpt") == ["teacher", "adapt"]
    # No warm-up: the adapt stage has no epoch with the teacher, so none is trained for it.
    assert stages("model.loss.teacher_w=2", "init_ckpt=s.ckpt", "adapt.warmup_epochs=0") == ["adapt"]
    cfg = typed_train("experiment=demo", "model.loss.teacher_w=2")
    assert uses_teacher(cfg, "source") and uses_teacher(cfg, "adapt") and not uses_teacher(cfg, "teacher")


def test_presets_set_the_official_teacher_weight_and_the_demo_leaves_it_off() -> None:
    for experiment in ("duke2market", "market2duke", "market2msmt", "duke2msmt"):
        cfg = typed_train(f"experiment={experiment}")
        assert cfg.model.loss.teacher_w == 2.0 and cfg.teacher.arch == "resnet50" and cfg.teacher.last_stride == 2
    demo = typed_train("experiment=demo")
    assert demo.model.loss.teacher_w == 0.0 and demo.teacher.arch == demo.model.appearance.arch == "resnet18"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["teacher_ckpt=t.ckpt"], r"teacher_ckpt='t.ckpt' is set but model.loss.teacher_w=0"),
        (["stage=teacher", "model.loss.teacher_w=2", "teacher_ckpt=t.ckpt"], "teacher_ckpt is set with stage=teacher"),
        (["teacher.last_stride=3"], r"'teacher.last_stride': must be 1 or 2"),
        (["teacher.erasing_p=1.5"], r"'teacher.erasing_p': must be a probability"),
        (["model.loss.teacher_w=-1"], r"'model.loss.teacher_w': must be a finite number >= 0"),
    ],
)
def test_bad_teacher_settings_are_refused_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        typed_train("experiment=demo", *overrides)
