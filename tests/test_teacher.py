"""The teacher network: output shapes, the last-stride option, and its state dict in the re-ID baseline's layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dgnetpp_pl.models.teacher import Teacher
from dgnetpp_pl.official_layout import export_state, import_state, teacher_layout
from dgnetpp_pl.teacher_checkpoint import load_teacher, save_teacher

OFFICIAL_KEYS = json.loads((Path(__file__).parent / "data" / "official_keys.json").read_text())


def _perturbed(teacher: Teacher, seed: int = 0) -> Teacher:
    """Every float entry (weights and BN statistics) moved off its initial value, so equality means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in teacher.state_dict().items():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
            if key.endswith("running_var"):
                t.abs_().add_(0.5)
    return teacher.eval()


def test_shapes_of_logits_pooled_feature_and_map() -> None:
    teacher = Teacher(num_classes=5).eval()
    x = torch.randn(2, 3, 128, 64)
    assert teacher(x).shape == (2, 5)
    assert teacher.pooled(x).shape == (2, 2048)
    assert teacher.num_classes == 5


def test_last_stride_changes_the_map_but_not_the_weights() -> None:
    x = torch.randn(1, 3, 128, 64)
    s2, s1 = Teacher(3, last_stride=2).eval(), Teacher(3, last_stride=1).eval()
    assert s2.feature_map(x).shape[-2:] == (4, 2)
    assert s1.feature_map(x).shape[-2:] == (8, 4)
    shapes = {k: v.shape for k, v in s2.state_dict().items()}
    assert shapes == {k: v.shape for k, v in s1.state_dict().items()}
    with pytest.raises(ValueError, match="last_stride must be 1 or 2"):
        Teacher(3, last_stride=4)


def test_pooling_is_the_average_of_the_map() -> None:
    teacher = _perturbed(Teacher(4))
    x = torch.randn(2, 3, 64, 32)
    assert torch.allclose(teacher.pooled(x), teacher.feature_map(x).mean(dim=(2, 3)), atol=1e-6)


def test_official_layout_has_the_baseline_names_and_shapes() -> None:
    teacher = Teacher(751)
    exported = export_state(teacher, teacher_layout(teacher))
    assert {k: list(v.shape) for k, v in exported.items()} == OFFICIAL_KEYS["teacher"]


def test_state_dict_round_trip_through_the_official_layout_is_exact() -> None:
    teacher = _perturbed(Teacher(6, last_stride=1))
    official = export_state(teacher, teacher_layout(teacher))
    fresh = Teacher(6, last_stride=1).eval()
    imported = import_state(official, fresh, teacher_layout(fresh), "net_last.pth")
    assert imported.unused == ["model.fc.bias", "model.fc.weight"]
    fresh.load_state_dict(imported.state)
    for key, value in teacher.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(2, 3, 64, 32)
    assert torch.equal(fresh(x), teacher(x))


def test_teacher_checkpoint_keeps_architecture_and_weights(tmp_path: Path) -> None:
    teacher = _perturbed(Teacher(7, last_stride=1, bottleneck_dim=256, droprate=0.3))
    back = load_teacher(save_teacher(teacher, tmp_path / "t.ckpt"))
    assert (back.num_classes, back.last_stride, back.head.dropout.p) == (7, 1, 0.3)
    assert back.head.bottleneck[0].out_features == 256
    x = torch.randn(2, 3, 64, 32)
    assert torch.equal(back(x), teacher(x))
